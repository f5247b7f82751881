"""``DiffusionDPOModule``: Diffusion-DPO with an updatable reference model (arXiv 2505.18736).

The module holds the trained ``policy`` denoiser, a :class:`~lightning_refdpo.backbones.Backbone`
(the frozen VAE and text encoders, and how this model family is noised and fed) and a
:class:`~lightning_refdpo.reference.ReferenceStrategy` (the reference and initial models as a
second LoRA adapter or as frozen copies). It keeps the DPO step, the Lightning hooks, the guard
against non-finite losses and undecodable data, and the optimizer. Each training step follows the
diffusers training examples: one noise and one timestep per pair shared by winner and loser.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule

from lightning_refdpo.backbones import Backbone, StableDiffusionBackbone
from lightning_refdpo.batch import PreferenceBatch, PreferenceStepOutput
from lightning_refdpo.checkpoint import current_key, restore_torch_rng_states, torch_rng_states
from lightning_refdpo.checks import DTYPES, check_module_settings
from lightning_refdpo.data.draws import NOISE_STREAM, pair_normal
from lightning_refdpo.guard import TrainingGuard, on_any_rank
from lightning_refdpo.hub import absolute_if_local
from lightning_refdpo.losses import (
    DEFAULT_DMPO_ALPHA,
    DEFAULT_IPO_TAU,
    LOSS_OPTIONS,
    LOSSES,
    LossOptions,
    PreferenceErrors,
    implicit_reward_margin,
    preference_loss,
    scale_loser_gradient,
    winner_preserving_scale,
)
from lightning_refdpo.optim import (
    LRSchedulerCallable,
    OptimizerCallable,
    build_lr_scheduler,
    build_optimizer,
    lr_scheduler_spec,
    optimizer_spec,
)
from lightning_refdpo.reference import CopiedReference, LoRAReference, ReferenceStrategy

# The frozen VAE, text encoders and denoiser copies stay in eval mode on purpose (see ``train``).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class DiffusionDPOModule(LightningModule):
    """Diffusion-DPO and its reference-update / timestep-aware variants; SD1.5-style models here,
    other families in subclasses that name their ``backbone_class``.

    Args:
        pretrained_model_name_or_path: hub id or local folder in the diffusers layout of the
            backbone; a local folder is stored as an absolute path, so exports and evaluations of a
            checkpoint work from any directory.
        revision, variant: passed to every ``from_pretrained`` (e.g. ``variant="fp16"``).
        vae_name_or_path: a VAE (hub id or folder holding an ``AutoencoderKL``) instead of the
            model's own, e.g. ``madebyollin/sdxl-vae-fp16-fix``.
        loss_type: a key of ``losses.LOSSES``: ``sigmoid`` (Diffusion-DPO), ``ipo``, ``hinge``,
            ``robust``, ``sft`` (no reference forward), ``dspo``, ``dmpo`` or ``kto`` (Diffusion-KTO,
            per image: on pairs the winner is desirable and the loser undesirable; also trains on
            unpaired labelled images, ``data.unpaired``).
        beta: KL strength of DPO on the margin ``h`` that keeps the 0.5 (5000 for SD1.5 and SDXL);
            for ``kto`` it multiplies the per-image reward without the 0.5 (the public script's
            ``--beta_dpo``, 1000); for ``dspo`` (``sd15`` form) it is also the scale of the score
            shift (0.001 in the public SD1.5 recipe).
        label_smoothing: conservative / robust DPO ``eps``.
        ipo_tau: IPO regularization (``losses.DEFAULT_IPO_TAU``).
        dspo_form: ``sd15`` or ``sdxl``, the two DSPO losses of the public code (``losses.dspo_loss``).
        dmpo_alpha: DMPO's target ``q = 1 - alpha`` (``losses.DEFAULT_DMPO_ALPHA``).
        kto_reference_point: ``batch_mean`` or ``class_means`` (``losses.kto_reference_point``).
        kto_lambda_desirable, kto_lambda_undesirable: Diffusion-KTO's ``lambda_d`` and ``lambda_u``.
        winner_preserving_mu: the safeguard of Diffusion-SDPO (arXiv 2511.03317), off with ``None``:
            the gradient of the loser branch of a pairwise loss is scaled by
            ``losses.winner_preserving_scale`` so that, to first order, a step never raises the
            winners' error; ``mu`` in ``[0, 1]`` is the share of the winners' own descent kept.
        reward_scale: multiply ``h`` by ``lambda(t) = 1 + norm(1/sqrt(SNR(t)))`` (arXiv 2505.18736, Sec. 4.2).
        lora_rank: ``None`` trains the whole denoiser; an int trains peft LoRA adapters of that rank.
        lora_alpha: LoRA scaling numerator (default: ``lora_rank``).
        lora_target_modules: denoiser modules to adapt (default: the backbone's attention projections).
        lora_dropout: dropout inside the policy adapter only, so reference and initial forwards are
            deterministic.
        learning_rate: per-pair learning rate; with ``scale_lr`` it is multiplied by the effective
            batch ``batch_size * accumulate_grad_batches * world_size`` (Diffusion-DPO: 1e-8 x 2048),
            for any optimizer.
        optimizer: the optimizer class, as ``class_path`` and ``init_args`` (without ``lr``: it is
            ``learning_rate``); ``None`` is ``torch.optim.AdamW`` with the Diffusion-DPO script's
            settings (betas 0.9 / 0.999, eps 1e-8, weight decay 1e-2; ``optim.DEFAULT_OPTIMIZER``).
            Documented choices in ``lightning_refdpo.optim``: AdamW, ``transformers.Adafactor``,
            ``bitsandbytes`` AdamW8bit.
        lr_scheduler: a ``diffusers.optimization.get_scheduler`` name, or a scheduler class as
            ``class_path`` and ``init_args`` (without the optimizer); stepped every optimizer step.
        lr_warmup_steps: linear warm-up of a named schedule (a scheduler class takes its own).
        adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon: the AdamW settings of version 0.1,
            kept so that its configs and checkpoints load: they set the default AdamW's
            ``init_args`` and are refused beside ``optimizer``.
        frozen_dtype: dtype of the frozen reference/initial copies in full fine-tuning (``bfloat16``
            halves their memory); ``None`` keeps the policy's. A 16-bit reference cannot take a soft
            update (``ReferenceModelUpdate.alpha < 1``): that combination is refused.
        offload_initial: full fine-tuning only: keep the initial model in CPU memory and bring it to
            the device for reference-update events, validation epochs and the evaluation baseline
            (``reference.CopiedReference``); saves one frozen copy of device memory between them.
        gradient_checkpointing: recompute denoiser activations in the backward pass.
        attention: ``sdpa`` (PyTorch scaled-dot-product attention), ``xformers`` or ``eager``.
        channels_last: denoisers in channels-last memory format.
        compile_unet: ``torch.compile`` the denoisers (``nn.Module.compile``: state-dict keys unchanged).
        validation_seed: seed of the timesteps and noise of validation, fixed so epochs compare.
        max_nonfinite_steps: a step whose loss is NaN or infinite on any rank is skipped on every
            rank and counted in ``train/nonfinite_steps``; this many in a row stop the run with
            :class:`NonFiniteLossError`.
        max_skipped_share: stop with :class:`UndecodablePairsError` when more than this share of the
            training pairs loaded so far, over all ranks, could not be decoded.
    """

    backbone_class: ClassVar[type[Backbone]] = StableDiffusionBackbone

    def __init__(
        self,
        pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
        revision: str | None = None,
        variant: str | None = None,
        vae_name_or_path: str | None = None,
        loss_type: str = "sigmoid",
        beta: float = 5000.0,
        label_smoothing: float = 0.0,
        ipo_tau: float = DEFAULT_IPO_TAU,
        dspo_form: str = "sd15",
        dmpo_alpha: float = DEFAULT_DMPO_ALPHA,
        kto_reference_point: str = "batch_mean",
        kto_lambda_desirable: float = 1.0,
        kto_lambda_undesirable: float = 1.0,
        winner_preserving_mu: float | None = None,
        reward_scale: bool = False,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: list[str] | None = None,
        lora_dropout: float = 0.0,
        learning_rate: float = 1e-8,
        scale_lr: bool = True,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: str | LRSchedulerCallable = "constant_with_warmup",
        lr_warmup_steps: int = 0,
        adam_beta1: float | None = None,
        adam_beta2: float | None = None,
        adam_weight_decay: float | None = None,
        adam_epsilon: float | None = None,
        frozen_dtype: str | None = None,
        offload_initial: bool = False,
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
        channels_last: bool = False,
        compile_unet: bool = False,
        validation_seed: int = 0,
        max_nonfinite_steps: int = 5,
        max_skipped_share: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        loss_options = {k: self.hparams[k] for k in LOSS_OPTIONS}
        check_module_settings(
            loss_type, loss_options, winner_preserving_mu, lora_rank, learning_rate, frozen_dtype, attention,
            max_nonfinite_steps, max_skipped_share,
        )  # fmt: skip
        for key in ("pretrained_model_name_or_path", "vae_name_or_path"):
            self.hparams[key] = absolute_if_local(self.hparams[key])
        # Plain class_path / init_args, so that a checkpoint records them and loads without unpickling code.
        legacy = {"adam_beta1": adam_beta1, "adam_beta2": adam_beta2, "adam_weight_decay": adam_weight_decay}
        legacy |= {"adam_epsilon": adam_epsilon}
        self.hparams["optimizer"] = optimizer_spec(
            self.hparams["optimizer"], {k: v for k, v in legacy.items() if v is not None}
        )
        self.hparams["lr_scheduler"] = lr_scheduler_spec(self.hparams["lr_scheduler"])
        if lr_warmup_steps and not isinstance(self.hparams["lr_scheduler"], str):
            raise ValueError(
                "model.lr_warmup_steps applies to a schedule named by a string; give a scheduler class its "
                "warm-up in its init_args, or set lr_warmup_steps: 0"
            )
        if offload_initial and lora_rank is not None:
            raise ValueError(
                "model.offload_initial applies to full fine-tuning: with LoRA the initial model is the "
                "denoiser with its adapters disabled and costs nothing; set offload_initial: false"
            )
        hp = self.hparams
        self.backbone = self.build_backbone()
        self.policy = self.backbone.load_denoiser()
        self.reference: ReferenceStrategy
        if lora_rank is not None:
            targets = lora_target_modules or self.backbone.default_lora_targets
            alpha = lora_alpha if lora_alpha is not None else lora_rank
            self.reference = LoRAReference(self.policy, lora_rank, alpha, targets, lora_dropout)
        else:
            dtype = DTYPES[frozen_dtype] if frozen_dtype else None
            self.reference = CopiedReference(self.policy, dtype, offload_initial)
        self.register_buffer("reward_scales", self.backbone.reward_scale_schedule(), persistent=False)
        if gradient_checkpointing:
            self.policy.enable_gradient_checkpointing()
        for denoiser in (self.policy, *self.reference.frozen_modules()):
            self.backbone.configure_denoiser(denoiser, hp.attention)
            if channels_last:
                denoiser.to(memory_format=torch.channels_last)
            if compile_unet:
                denoiser.compile()
        self.guard = TrainingGuard(max_nonfinite_steps, max_skipped_share)
        self.train()
        # Frozen parts (VAE, text encoders, initial model, LoRA base weights) reload from the model id.
        self.strict_loading = False

    def build_backbone(self) -> Backbone:
        """The :attr:`backbone_class` for this module's model, with :meth:`backbone_options`."""
        hp = self.hparams
        return self.backbone_class(
            hp.pretrained_model_name_or_path,
            hp.revision,
            hp.variant,
            hp.vae_name_or_path,
            **self.backbone_options(),
        )

    def backbone_options(self) -> dict[str, Any]:
        """The family's own options of its backbone (a subclass's extra hyperparameters)."""
        return {}

    @property
    def uses_lora(self) -> bool:
        return self.reference.uses_lora

    def train(self, mode: bool = True) -> DiffusionDPOModule:
        super().train(mode)
        for module in (self.backbone, *self.reference.frozen_modules()):
            module.eval()
        return self

    def build_pipeline(self, denoiser: torch.nn.Module | None = None) -> Any:
        """A diffusers pipeline over the backbone and ``denoiser`` (default: the policy; pass the
        one of ``reference.initial(policy)`` for the base model)."""
        return self.backbone.build_pipeline(self.policy if denoiser is None else denoiser)

    # ------------------------------------------------------------------ the DPO step
    def prediction_error(self, model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample ``mean ||target - pred||^2`` over latent elements (override to change it)."""
        return (model_pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, target.ndim)))

    def errors_of(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Any,
        target: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`prediction_error` of ``denoiser`` (policy, reference or initial model) at ``x_t``."""
        return self.prediction_error(self.backbone.predict(denoiser, noisy, timesteps, cond), target)

    def preference_step(
        self,
        batch: PreferenceBatch,
        timesteps: torch.Tensor,
        generator: torch.Generator | None = None,
        against_initial: bool = False,
    ) -> PreferenceStepOutput:
        """Per-pair loss, margin ``h`` and prediction errors of a preference batch at ``timesteps``
        (Diffusion-DPO, Wallace et al. 2024, Eq. 14, or the ``loss_type`` of ``losses.LOSSES``; the
        reward scale of arXiv 2505.18736 Eq. 10); with ``against_initial`` also the margin against
        the initial model (one more forward).

        The policy sees winners and losers in one batched forward, the reference in one no-grad
        forward (none for a loss without reference); both share ``t`` and the noise within a pair.
        Noise comes from ``generator`` when given (validation, analysis), else from each pair's
        ``noise_seeds`` (training batches, ``data/draws.py``), else from the global RNG. With
        ``winner_preserving_mu`` the losers' errors enter the loss with their gradient scaled by
        ``losses.winner_preserving_scale`` (Diffusion-SDPO).
        """
        hp = self.hparams
        objective = LOSSES[hp.loss_type]
        if "caption_l" in batch and not objective.per_image:
            raise ValueError(
                f"this batch couples unpaired labelled images (data.unpaired), which only a per-image loss "
                f"can train ({', '.join(k for k, v in LOSSES.items() if v.per_image)}); model.loss_type is "
                f"{hp.loss_type!r}: train it on preference pairs (data.unpaired: false)"
            )
        latents_w, latents_l, cond = self.backbone.encode_batch(batch)
        if generator is not None:
            noise = torch.randn(latents_w.shape, generator=generator).to(latents_w)
        elif "noise_seeds" in batch:
            noise = pair_normal(batch["noise_seeds"], NOISE_STREAM, latents_w.shape[1:]).to(latents_w)
        else:
            noise = torch.randn_like(latents_w)
        latents, noise = torch.cat([latents_w, latents_l]), noise.repeat(2, *[1] * (noise.ndim - 1))
        timesteps = timesteps.to(self.device).repeat(2)
        cond = self.backbone.pair_conditioning(cond)
        noisy = self.backbone.add_noise(latents, noise, timesteps)
        target = self.backbone.diffusion_target(latents, noise, timesteps)
        weights = self.reward_scales[timesteps[: len(latents_w)]] if hp.reward_scale else None

        def frozen_prediction(denoiser_context: Any) -> tuple[torch.Tensor, ...]:
            """A no-grad model's prediction on the winners, its errors and the policy's margin to it."""
            with torch.no_grad(), denoiser_context as denoiser:
                prediction = self.backbone.predict(denoiser, noisy, timesteps, cond)
            other_w, other_l = self.prediction_error(prediction, target).chunk(2)
            margin = implicit_reward_margin(mse_w, mse_l, other_w, other_l, weights).detach()
            return prediction.chunk(2)[0], other_w, other_l, margin

        prediction = self.backbone.predict(self.policy, noisy, timesteps, cond)
        mse_w, mse_l = self.prediction_error(prediction, target).chunk(2)
        residual_w, residual_l = (prediction.float() - target.float()).chunk(2)
        ref_prediction_w = ref_mse_w = ref_mse_l = margin = initial_margin = loser_scale = None
        if objective.needs_reference:
            ref_prediction_w, ref_mse_w, ref_mse_l, margin = frozen_prediction(
                self.reference.reference(self.policy)
            )
        if against_initial:
            initial_margin = frozen_prediction(self.reference.initial(self.policy))[3]
        loser_mse = mse_l
        if hp.winner_preserving_mu is not None:
            loser_scale = winner_preserving_scale(residual_w, residual_l, hp.winner_preserving_mu)
            loser_mse = scale_loser_gradient(mse_l, loser_scale)
        ref_gap_w = None
        if ref_prediction_w is not None:
            ref_gap_w = prediction.chunk(2)[0].float() - ref_prediction_w.float()
        errors = PreferenceErrors(mse_w, loser_mse, ref_mse_w, ref_mse_l, weights, residual_w, ref_gap_w)
        loss = preference_loss(errors, self.loss_options(), hp.loss_type)
        return PreferenceStepOutput(
            loss, mse_w.detach(), mse_l.detach(), margin, ref_mse_w, ref_mse_l, initial_margin, loser_scale
        )

    def loss_options(self) -> LossOptions:
        """The loss hyperparameters; under several processes Diffusion-KTO's reference point is
        averaged over ranks, as the public script reduces it over processes."""
        trainer = self._trainer
        mean_over_ranks = None
        if trainer is not None and trainer.world_size > 1:
            mean_over_ranks = lambda x: trainer.strategy.reduce(x, reduce_op="mean")  # noqa: E731
        return LossOptions(**{k: self.hparams[k] for k in LOSS_OPTIONS}, mean_over_ranks=mean_over_ranks)

    @torch.no_grad()
    def estimate_divergence(
        self,
        batch: PreferenceBatch,
        num_samples: int,
        candidate: str = "policy",
        generator: torch.Generator | None = None,
        sample_seeds: list[int] | None = None,
    ) -> torch.Tensor:
        """``D = mean(mse_cand(x^w) - mse_init(x^w))`` on ``num_samples`` winners of ``batch``: the
        forward-process estimate of ``KL(p_cand || p_init)`` of arXiv 2505.18736 (Eq. 8) with the
        constant timestep weighting of Diffusion-DPO, ``t ~ U{0..T-1}`` and noise for each winner
        from a generator seeded with ``sample_seeds[i]`` (the same draws wherever the winner is),
        else all from ``generator``. ``candidate`` is ``"policy"``, ``"reference"`` or ``"hard_copy"``
        (the policy as a hard copy into the reference would store it, ``ReferenceStrategy.hard_copy``)."""
        n = min(num_samples, len(batch["caption"]))
        subset = {k: v[:n] for k, v in batch.items() if isinstance(v, torch.Tensor | list)}
        latents, _, cond = self.backbone.encode_batch(subset)
        generators = (
            [torch.Generator().manual_seed(int(s)) for s in sample_seeds[:n]]
            if sample_seeds
            else [generator] * n
        )
        T = self.backbone.num_train_timesteps
        timesteps = torch.stack([torch.randint(0, T, (), generator=g) for g in generators]).to(self.device)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents)
        noisy = self.backbone.add_noise(latents, noise, timesteps)
        target = self.backbone.diffusion_target(latents, noise, timesteps)
        candidate_model = {
            "policy": lambda: nullcontext(self.policy),
            "reference": lambda: self.reference.reference(self.policy),
            "hard_copy": lambda: self.reference.hard_copy(self.policy),
        }[candidate]()
        errors = []
        for context in (candidate_model, self.reference.initial(self.policy)):
            with context as denoiser:
                errors.append(self.errors_of(denoiser, noisy, timesteps, cond, target))
        return (errors[0] - errors[1]).mean()

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        sampler = getattr(self.trainer.datamodule, "timestep_sampler", None) if self.trainer else None
        T = self.backbone.num_train_timesteps
        if sampler is not None and sampler.num_train_timesteps != T:
            raise ValueError(
                f"data.timestep_sampler.num_train_timesteps is {sampler.num_train_timesteps} but the model's "
                f"scheduler has {T}; set data.init_args.timestep_sampler.init_args.num_train_timesteps: {T}"
            )

    def on_fit_start(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        self.reference.check_sharding(self.policy, isinstance(self.trainer.strategy, FSDPStrategy))

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor | None:
        skipped = int(batch.get("num_skipped", 0))
        self.guard.count_pairs(len(batch["caption"]), skipped)
        if skipped:
            self.log("train/skipped_pairs", float(skipped), on_step=False, on_epoch=True, reduce_fx="sum")
        # A batch of undecodable pairs only: every rank skips the step, as DDP needs.
        if on_any_rank(not batch["caption"], self.trainer.strategy, self.device):
            return None
        figures = self.preference_step(batch, batch["timesteps"]).summary()
        if self.guard.skip_nonfinite(figures["loss"], self.trainer.strategy, self.global_step):
            self.log("train/nonfinite_steps", float(self.guard.nonfinite_steps), on_step=True, on_epoch=False)
            return None
        self.log_figures("train", figures, len(batch["caption"]), on_step=True)
        return figures["loss"]

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.hparams.validation_seed + batch_idx)
        timesteps = torch.randint(
            0, self.backbone.num_train_timesteps, (len(batch["caption"]),), generator=generator
        )
        figures = self.preference_step(batch, timesteps, generator=generator, against_initial=True).summary()
        self.log_figures("val", figures, len(batch["caption"]), on_step=False)
        return figures["loss"]

    def log_figures(
        self, stage: str, figures: dict[str, torch.Tensor], batch_size: int, on_step: bool
    ) -> None:
        shown = {"loss", "implicit_acc"}
        for keys, prog_bar in ((figures.keys() & shown, True), (figures.keys() - shown, False)):
            logged = {f"{stage}/{k}": figures[k].detach() for k in sorted(keys)}
            self.log_dict(
                logged,
                batch_size=batch_size,
                on_step=on_step,
                on_epoch=True,
                prog_bar=prog_bar,
                sync_dist=True,
            )

    def on_validation_epoch_start(self) -> None:
        self.reference.load_initial(self.device)  # for the margins against it, batch after batch

    def on_validation_epoch_end(self) -> None:
        self.reference.unload_initial()

    def on_train_epoch_end(self) -> None:
        self.guard.check_skipped_pairs(self.trainer.strategy, self.device)

    def on_train_end(self) -> None:
        self.guard.check_skipped_pairs(self.trainer.strategy, self.device)

    # ------------------------------------------------------------------ the optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        """``model.optimizer`` over the trainable policy parameters at ``learning_rate`` (times the
        effective batch with ``scale_lr``) and ``model.lr_scheduler``, stepped every optimizer step."""
        hp = self.hparams
        lr = hp.learning_rate
        if hp.scale_lr:
            batch_size = getattr(self.trainer.datamodule, "train_batch_size", None)
            if batch_size is None:
                raise ValueError(
                    "model.scale_lr needs the per-device batch size from a datamodule with `train_batch_size`; "
                    "use PreferenceDataModule or set model.init_args.scale_lr: false"
                )
            lr *= batch_size * self.trainer.accumulate_grad_batches * self.trainer.world_size
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = build_optimizer(hp.optimizer, params, lr)
        total = self.trainer.estimated_stepping_batches
        scheduler = build_lr_scheduler(
            hp.lr_scheduler, optimizer, hp.lr_warmup_steps, int(total) if math.isfinite(total) else None
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_keys(self) -> list[str]:
        """State-dict keys a checkpoint must hold: the trained weights and the reference, not the
        frozen parts that reload from the model id."""
        return [key for key in self.state_dict() if self.reference.keeps(key)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["rng_states"] = torch_rng_states()
        checkpoint["nonfinite_steps"] = (self.guard.nonfinite_steps, self.guard.nonfinite_in_a_row)
        checkpoint["logger_version"] = self.logger.version if self.logger is not None else None
        keep = set(self.checkpoint_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {current_key(k): v for k, v in checkpoint["state_dict"].items()}
        missing = [k for k in self.checkpoint_keys() if k not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} policy/reference weights (first: {missing[0]}); was it "
                "written with the same lora_rank and lora_target_modules?"
            )
        if "rng_states" in checkpoint and self._trainer is not None:  # resuming a fit
            restore_torch_rng_states(checkpoint["rng_states"])
            self.guard.nonfinite_steps, self.guard.nonfinite_in_a_row = checkpoint["nonfinite_steps"]
