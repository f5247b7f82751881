"""``ImplicitRewardByTimestep``: the implicit reward and its accuracy per timestep interval.

The analysis of arXiv 2505.18736, Figure 2 (b, c): on validation pairs, the margin ``h`` of the
training loss (times ``lambda(t)`` when ``model.reward_scale`` is on) and the implicit accuracy
``mean(h > 0)`` (ties count 1/2, as ``val/implicit_acc``) for ``num_intervals`` equal intervals of
``t``; it shows where along the denoising chain the policy has learned the preference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_refdpo.backbones import Backbone
from lightning_refdpo.batch import PreferenceBatch, PreferenceStepOutput


class PreferenceStepper(Protocol):
    """What :class:`ImplicitRewardByTimestep` needs from the LightningModule besides Lightning's
    own API (``DiffusionDPOModule`` provides it)."""

    backbone: Backbone

    def preference_step(
        self, batch: PreferenceBatch, timesteps: torch.Tensor, generator: torch.Generator | None = None
    ) -> PreferenceStepOutput: ...


class ImplicitRewardByTimestep(Callback):
    """After a validation epoch: mean implicit reward and accuracy per timestep interval.

    For each validation batch and each interval ``k`` of ``[k T / n, (k + 1) T / n)``, one ``t`` per
    pair is drawn uniformly inside the interval (seeded, so epochs compare) and the margin
    ``h = -0.5 ((mse_theta^w - mse_theta^l) - (mse_ref^w - mse_ref^l))`` is computed. Logged as
    ``implicit_reward/t<lo>-<hi>`` and ``implicit_acc/t<lo>-<hi>``; the numbers are written to
    ``<log_dir>/implicit_reward/step<N>.json`` and plotted in ``step<N>.png``.

    Each analysis costs ``num_intervals`` no-grad passes (policy and reference forwards) over the
    validation batches it uses; ``every_n_steps`` and ``max_batches`` bound that cost.

    Args:
        num_intervals: equal intervals of ``t`` (the paper's Figure 2: 10).
        seed: seed of the timesteps and noise, the same at every analysis.
        every_n_steps: minimum optimizer steps between two analyses (``None``: every validation).
        max_batches: validation batches per rank it uses, the first ones (``None``: all).
    """

    def __init__(
        self,
        num_intervals: int = 10,
        seed: int = 0,
        every_n_steps: int | None = None,
        max_batches: int | None = None,
    ) -> None:
        if num_intervals < 1:
            raise ValueError(f"ImplicitRewardByTimestep.num_intervals must be >= 1; got {num_intervals}")
        for name, value in (("every_n_steps", every_n_steps), ("max_batches", max_batches)):
            if value is not None and value < 1:
                raise ValueError(f"ImplicitRewardByTimestep.{name} must be >= 1 or null; got {value}")
        self.num_intervals = num_intervals
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.max_batches = max_batches
        self.last_step = -1
        self.active = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        since_last = trainer.global_step - self.last_step
        self.active = not trainer.sanity_checking and (
            self.every_n_steps is None or self.last_step < 0 or since_last >= self.every_n_steps
        )
        self.margin_sum = torch.zeros(self.num_intervals, dtype=torch.float64)
        self.correct = torch.zeros(self.num_intervals, dtype=torch.float64)
        self.count = torch.zeros(self.num_intervals, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(self.seed)

    def intervals(self, num_train_timesteps: int) -> list[tuple[int, int]]:
        edges = [k * num_train_timesteps // self.num_intervals for k in range(self.num_intervals + 1)]
        return list(zip(edges[:-1], edges[1:], strict=True))

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: PreferenceStepper,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        past_limit = self.max_batches is not None and batch_idx >= self.max_batches
        if not self.active or past_limit or not batch["caption"]:
            return
        num_pairs = len(batch["caption"])
        for k, (lo, hi) in enumerate(self.intervals(pl_module.backbone.num_train_timesteps)):
            timesteps = torch.randint(lo, hi, (num_pairs,), generator=self.generator)
            margin = pl_module.preference_step(batch, timesteps, generator=self.generator).reward_margin
            if margin is None:
                raise ValueError(
                    f"ImplicitRewardByTimestep needs a reference model; model.loss_type "
                    f"{pl_module.hparams.loss_type!r} has none: remove the callback or use a DPO loss"
                )
            margin = margin.double().cpu()
            self.margin_sum[k] += margin.sum()
            self.correct[k] += (margin > 0).sum() + 0.5 * (margin == 0).sum()
            self.count[k] += num_pairs

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: PreferenceStepper) -> None:
        if not self.active:
            return
        self.last_step = trainer.global_step
        totals = trainer.strategy.reduce(
            torch.stack([self.margin_sum, self.correct, self.count]), reduce_op="sum"
        )
        margin_sum, correct, count = totals.cpu()
        if count.sum() == 0:
            return
        intervals = self.intervals(pl_module.backbone.num_train_timesteps)
        mean_reward = (margin_sum / count.clamp(min=1)).tolist()
        accuracy = (correct / count.clamp(min=1)).tolist()
        for (lo, hi), reward, acc in zip(intervals, mean_reward, accuracy, strict=True):
            pl_module.log(f"implicit_reward/t{lo}-{hi}", reward)
            pl_module.log(f"implicit_acc/t{lo}-{hi}", acc)
        if trainer.is_global_zero:
            self.save(trainer, intervals, mean_reward, accuracy)

    def save(
        self, trainer: Trainer, intervals: list[tuple[int, int]], reward: list[float], accuracy: list[float]
    ) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder = Path(trainer.log_dir or trainer.default_root_dir) / "implicit_reward"
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"step{trainer.global_step}"
        table = {
            "step": trainer.global_step,
            "intervals": intervals,
            "mean_implicit_reward": reward,
            "implicit_accuracy": accuracy,
        }
        stem.with_suffix(".json").write_text(json.dumps(table, indent=2))
        centres = [(lo + hi) / 2 for lo, hi in intervals]
        fig, (ax_reward, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
        ax_reward.bar(centres, reward, width=0.8 * (intervals[0][1] - intervals[0][0]))
        ax_reward.set(xlabel="timestep t", ylabel="mean implicit reward h", title="Implicit reward")
        ax_acc.plot(centres, accuracy, marker="o")
        ax_acc.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax_acc.set(xlabel="timestep t", ylabel="mean(h > 0)", title="Implicit accuracy", ylim=(0, 1))
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=100)
        plt.close(fig)
        return stem.with_suffix(".png")

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
