"""``ReferenceModelUpdate``: move the DPO reference towards the policy under a divergence cap.

arXiv 2505.18736, Sec. 4.1 and Eq. 8 (see docs/METHOD.md): every ``tau`` optimizer steps the
reference is replaced by the current policy, unless the candidate has drifted further than ``delta``
from the initial model, in which case the reference freezes for the rest of training (or, for the
paper's "Re-Init" ablation, is reset to the initial model).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_refdpo.batch import PreferenceBatch
from lightning_refdpo.data.draws import hash_seed
from lightning_refdpo.reference import ReferenceStrategy

ON_EXCEED = ("freeze", "reinit")


class UpdatableReference(Protocol):
    """What :class:`ReferenceModelUpdate` needs from the LightningModule besides Lightning's own
    API (``DiffusionDPOModule`` provides it)."""

    policy: torch.nn.Module
    reference: ReferenceStrategy

    def estimate_divergence(
        self, batch: PreferenceBatch, num_samples: int, candidate: str, *, sample_seeds: list[int]
    ) -> torch.Tensor: ...


class ReferenceModelUpdate(Callback):
    """Reference update with regularization.

    At every ``every_n_steps``-th optimizer step, unless frozen:

    1. the candidate ``ref' = (1 - alpha) ref + alpha theta``. With ``alpha = 1`` (the hard copy of
       TR-DPO, the paper's setting) it is the policy itself, measured without touching the
       reference (``ReferenceStrategy.hard_copy``) and copied in only once accepted, so a refused
       candidate costs nothing to undo. A soft update (``alpha < 1``), and a hard copy into a bf16
       reference under FSDP, are formed in the reference itself, the previous reference kept in CPU
       memory to undo them;
    2. estimate ``D = mean(mse_ref'(x^w) - mse_init(x^w))`` on ``divergence_samples`` winners of the
       current batch of each rank (Eq. 8, constant weighting). The candidate is measured as it will
       be stored, in the reference's dtype, which is the initial model's: with
       ``frozen_dtype: bfloat16`` both are bf16, so ``D`` is exactly 0 while the policy has not
       moved instead of the rounding gap between an fp32 policy and a bf16 initial model.
       Each winner draws its own ``t ~ U{0..T-1}`` and noise from a seed of ``(seed, step, pair)``
       (``pair``: the pair's ``noise_seeds`` entry from ``data/draws.py``, else its rank and position), so
       ranks draw differently and a winner draws the same wherever it lands;
       ``D`` is the mean over the winners of all ranks (``sum_r n_r D_r / sum_r n_r``, one value
       all-reduced), so every rank takes the same decision;
    3. if ``max_divergence`` is ``None`` or ``D <= max_divergence``: keep ``ref'``; otherwise keep
       the previous reference and, with ``on_exceed="freeze"``, freeze it for good, or with
       ``"reinit"`` reset it to the initial model (and keep updating later).

    ``D`` is read on the per-element MSE scale on which the paper's thresholds ``delta = 0.005``
    (SD1.5) and ``0.002`` (SDXL) are stated. Logs ``ref/divergence``, ``ref/updates``,
    ``ref/frozen`` and ``ref/reinits`` at every event. The update count, the frozen flag and the
    last divergence are saved with the checkpoint; the reference weights are in the module's state
    dict, and the draws depend on the step only, so a resumed run continues exactly.

    Args:
        every_n_steps: ``tau``, optimizer steps between update events (16, 32 or 64 in the paper).
        alpha: mixing weight of the soft update; only ``1.0`` with LoRA (see
            ``reference.LoRAReference``) or with a 16-bit reference (``frozen_dtype``),
            whose rounding would swallow small soft steps.
        max_divergence: ``delta``; ``None`` updates without a cap.
        on_exceed: ``"freeze"`` (the paper's method) or ``"reinit"``.
        divergence_samples: winners per rank used for the estimate.
        seed: seed of the timesteps and noise of the estimate.
    """

    def __init__(
        self,
        every_n_steps: int = 32,
        alpha: float = 1.0,
        max_divergence: float | None = None,
        on_exceed: str = "freeze",
        divergence_samples: int = 4,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"ReferenceModelUpdate.every_n_steps (tau) must be >= 1; got {every_n_steps}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"ReferenceModelUpdate.alpha must be in (0, 1]; got {alpha}")
        if max_divergence is not None and not (math.isfinite(max_divergence) and max_divergence >= 0):
            raise ValueError(
                "ReferenceModelUpdate.max_divergence (delta) must be a finite number >= 0, or null for no "
                f"cap; got {max_divergence}"
            )
        if on_exceed not in ON_EXCEED:
            raise ValueError(
                f"ReferenceModelUpdate.on_exceed must be one of {', '.join(ON_EXCEED)}; got {on_exceed!r}"
            )
        if divergence_samples < 1:
            raise ValueError(
                f"ReferenceModelUpdate.divergence_samples must be >= 1; got {divergence_samples}"
            )
        self.every_n_steps = every_n_steps
        self.alpha = alpha
        self.max_divergence = max_divergence
        self.on_exceed = on_exceed
        self.divergence_samples = divergence_samples
        self.seed = seed
        self.num_updates = 0
        self.num_reinits = 0
        self.frozen = False
        self.last_divergence = math.nan
        self.last_event_step = 0

    def setup(self, trainer: Trainer, pl_module: UpdatableReference, stage: str) -> None:
        if stage == "fit":
            pl_module.reference.check_update(pl_module.policy, self.alpha)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.frozen or step == self.last_event_step or step % self.every_n_steps:
            return
        self.last_event_step = step
        self.update(trainer, pl_module, batch)

    def sample_seeds(self, trainer: Trainer, batch: dict[str, Any], num_samples: int) -> list[int]:
        """One seed per winner used: of ``(seed, step, noise_seed)`` for training pairs that carry
        their own ``noise_seeds``, else of ``(seed, step, rank, position)``."""
        step = trainer.global_step
        if "noise_seeds" in batch:
            pairs = [(int(s),) for s in batch["noise_seeds"][:num_samples]]
        else:
            pairs = [(trainer.global_rank, i) for i in range(num_samples)]
        return [hash_seed(self.seed, step, *pair) for pair in pairs]

    def update(self, trainer: Trainer, pl_module: UpdatableReference, batch: PreferenceBatch) -> None:
        """One update event: form the candidate, estimate its divergence, then keep, freeze or reset."""
        was_training = pl_module.training
        pl_module.eval()
        reference, policy = pl_module.reference, pl_module.policy
        in_place = self.alpha == 1.0 and reference.measures_hard_copy(policy)
        previous = None
        if not in_place:
            previous = reference.state(policy)
            reference.update(policy, self.alpha)
        num_samples = min(self.divergence_samples, len(batch["caption"]))
        divergence_sum = torch.zeros((), device=pl_module.device)
        if num_samples:
            seeds = self.sample_seeds(trainer, batch, num_samples)
            candidate = "hard_copy" if in_place else "reference"
            divergence = pl_module.estimate_divergence(batch, num_samples, candidate, sample_seeds=seeds)
            divergence_sum = divergence.detach().float() * num_samples
        pl_module.train(was_training)
        totals = torch.stack([divergence_sum, torch.tensor(float(num_samples), device=pl_module.device)])
        divergence_sum, num_samples = trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        if not num_samples:  # no decodable winner on any rank: no event
            if previous is not None:
                reference.load_state(policy, previous)
            return
        self.last_divergence = divergence_sum / num_samples

        if self.max_divergence is None or self.last_divergence <= self.max_divergence:
            if in_place:
                reference.update(policy, 1.0)
            self.num_updates += 1
        else:
            if previous is not None:
                reference.load_state(policy, previous)
            if self.on_exceed == "freeze":
                self.frozen = True
            else:
                reference.reset(policy)
                self.num_reinits += 1
        pl_module.log_dict(
            {
                "ref/divergence": self.last_divergence,
                "ref/updates": float(self.num_updates),
                "ref/frozen": float(self.frozen),
                "ref/reinits": float(self.num_reinits),
            },
            on_step=True,
            on_epoch=False,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_updates": self.num_updates,
            "num_reinits": self.num_reinits,
            "frozen": self.frozen,
            "last_divergence": self.last_divergence,
            "last_event_step": self.last_event_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = state_dict["num_updates"]
        self.num_reinits = state_dict["num_reinits"]
        self.frozen = state_dict["frozen"]
        self.last_divergence = state_dict["last_divergence"]
        self.last_event_step = state_dict["last_event_step"]
