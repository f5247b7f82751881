"""``PreferenceEvaluation``: generate for held-out prompts, score, compare with the initial model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from lightning.pytorch import Callback, Trainer

from lightning_refdpo.backbones import Backbone
from lightning_refdpo.evaluation import (
    GenerationConfig,
    compare,
    evaluation_items,
    generate,
    image_grid,
    in_dtype,
    log_image,
    score,
)
from lightning_refdpo.evaluation.generation import sampler_config
from lightning_refdpo.metrics import RewardScore
from lightning_refdpo.prompts import load_prompts
from lightning_refdpo.reference import ReferenceStrategy


class PipelineSource(Protocol):
    """What :class:`PreferenceEvaluation` needs from the LightningModule besides Lightning's own
    API (``DiffusionDPOModule`` provides it)."""

    policy: torch.nn.Module
    reference: ReferenceStrategy
    backbone: Backbone

    def build_pipeline(self, denoiser: torch.nn.Module | None = None) -> Any: ...


class PreferenceEvaluation(Callback):
    """Reward-model evaluation of the policy during training (and in ``lightning-refdpo validate``).

    At the end of validation (at most once every ``every_n_steps`` optimizer steps) and once more
    at the end of training, images are generated for every (prompt, seed) pair with a diffusers
    pipeline over the current policy, in eval mode and without gradients, and scored by each
    scorer. Logged: ``eval/<scorer>`` (mean), ``eval/<scorer>_win_rate`` (share of pairs where the
    policy beats the initial model with the same prompt and seed), ``eval/initial/<scorer>``, and
    an image grid (captions under the images, policy above the initial model) to the logger and as
    a PNG in the log directory. The initial model's images are generated once and their scores
    kept (with LoRA the initial model is the UNet with adapters disabled: no second copy). Both
    sides go through ``build_pipeline`` (same components and scheduler) in the policy's dtype (a
    bf16 ``frozen_dtype`` initial UNet is cast for the duration) under the trainer's precision.

    Under DDP the items are split across ranks (round robin, so that every rank gets work) and the
    scores gathered, so every rank logs the same; the figures then match one process's to float
    rounding (``lightning-refdpo evaluate`` shards fixed batches and matches it byte for byte).

    Args:
        prompts: a prompt-set name or file (see ``lightning_refdpo.prompts``) or a list of prompts.
        scorers: reward metrics, e.g. ``[PickScore, HPSv2, ...]`` as ``class_path`` entries.
        seeds: one image per prompt and seed (the paper: 5 seeds).
        max_prompts: keep the first N prompts.
        every_n_steps: minimum optimizer steps between evaluations (``None``: every validation).
        num_inference_steps, guidance_scale, scheduler: the sampler; by default the paper's for the
            model family (``lightning_refdpo.evaluation.generation.SAMPLERS``): SD1.5 DDIM, 50
            steps, guidance 7.5; SDXL the base model's own scheduler, 50 steps, guidance 5.0.
        resolution, batch_size: image side (default: the model's) and images per forward.
        grid_size: images in the logged grid.
    """

    def __init__(
        self,
        prompts: str | list[str],
        scorers: Sequence[RewardScore],
        seeds: Sequence[int] = (0,),
        max_prompts: int | None = None,
        every_n_steps: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        resolution: int | None = None,
        scheduler: str | None = None,
        batch_size: int = 8,
        grid_size: int = 8,
    ) -> None:
        if not scorers:
            raise ValueError("PreferenceEvaluation.scorers must name at least one reward metric")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"PreferenceEvaluation.every_n_steps must be >= 1 or null; got {every_n_steps}")
        self.prompts = prompts
        self.scorers = {s.name: s for s in scorers}
        self.seeds = list(seeds)
        self.max_prompts = max_prompts
        self.every_n_steps = every_n_steps
        self.sampler = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "scheduler": scheduler,
        }
        self.resolution, self.batch_size = resolution, batch_size
        self.config: GenerationConfig | None = None
        self.grid_size = grid_size
        self.items: list[tuple[str, int]] = []
        self.baseline_scores: dict[str, torch.Tensor] | None = None
        self.baseline_images: torch.Tensor | None = None
        self.last_step = -1

    def setup(self, trainer: Trainer, pl_module: PipelineSource, stage: str) -> None:
        prompts = self.prompts if isinstance(self.prompts, list) else load_prompts(self.prompts)
        self.items = evaluation_items(prompts[: self.max_prompts], self.seeds)
        self.config = sampler_config(
            pl_module.build_pipeline(), self.resolution, self.batch_size, **self.sampler
        )
        if self.config.scheduler is None:
            self.config.scheduler = type(pl_module.backbone.base_scheduler()).__name__
        for scorer in self.scorers.values():
            scorer.to(pl_module.device)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: PipelineSource) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        if (
            self.every_n_steps is not None
            and self.last_step >= 0
            and step - self.last_step < self.every_n_steps
        ):
            return
        metrics = self.evaluate(trainer, pl_module)
        for name, value in metrics.items():
            pl_module.log(name, value)

    def on_train_end(self, trainer: Trainer, pl_module: PipelineSource) -> None:
        if self.last_step != trainer.global_step:
            metrics = self.evaluate(trainer, pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def evaluate(self, trainer: Trainer, pl_module: PipelineSource) -> dict[str, float]:
        """Generate, score and log one evaluation; returns the scalar figures."""
        self.last_step = trainer.global_step
        shard = self.items[trainer.global_rank :: trainer.world_size]
        prompts = [prompt for prompt, _ in shard]
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            if self.baseline_scores is None:
                policy_dtype = next(pl_module.policy.parameters()).dtype
                initial = pl_module.reference.initial(pl_module.policy)
                with initial as denoiser, in_dtype(denoiser, policy_dtype):
                    images = generate(pl_module.build_pipeline(denoiser), shard, self.config)
                self.baseline_scores = score(self.scorers, images, prompts)
                self.baseline_images = images[: self.grid_size]
            images = generate(pl_module.build_pipeline(), shard, self.config)
        pl_module.train(was_training)
        results = compare(score(self.scorers, images, prompts), self.baseline_scores)
        metrics = {}
        for name, figures in results.items():
            metrics[f"eval/{name}"] = figures["model_mean"]
            metrics[f"eval/{name}_win_rate"] = figures["win_rate"]
            metrics[f"eval/initial/{name}"] = figures["baseline_mean"]
        if trainer.is_global_zero and self.grid_size > 0:
            shown = images[: self.grid_size]
            captions = [prompt for prompt, _ in shard[: len(shown)]]
            grid = image_grid(
                torch.cat([shown, self.baseline_images[: len(shown)]]), captions * 2, columns=len(shown)
            )
            log_image(trainer, "eval/policy_vs_initial", grid, trainer.global_step)
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline_scores": self.baseline_scores,
            "baseline_images": self.baseline_images,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline_scores = state_dict["baseline_scores"]
        self.baseline_images = state_dict["baseline_images"]
        self.last_step = state_dict["last_step"]
