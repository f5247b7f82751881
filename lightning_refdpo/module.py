"""``DiffusionDPOModule``: Diffusion-DPO with an updatable reference model (arXiv 2505.18736).

One LightningModule holds the three models of METHOD.md: the policy ``theta`` (trained), the
reference ``ref`` and the initial model ``init``.

- LoRA (``lora_rank`` set): one UNet with the peft adapters ``policy`` and ``reference``; ``init``
  is the same UNet with adapters disabled (see ``lora.py``).
- Full fine-tuning: ``unet`` is the policy, ``reference_unet`` and ``initial_unet`` frozen copies.

The reference is moved by the ``ReferenceModelUpdate`` callback through :meth:`update_reference`,
:meth:`reset_reference` and :meth:`estimate_divergence`. Each training step follows the diffusers
training examples: VAE latents, one noise and one timestep per pair shared by winner and loser,
``x_t`` from the scheduler's ``add_noise``, and the scheduler's ``prediction_type`` target.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_refdpo import lora
from lightning_refdpo.data.draws import LATENT_STREAM, NOISE_STREAM, pair_normal
from lightning_refdpo.hub import load_component
from lightning_refdpo.losses import DEFAULT_IPO_TAU, LOSS_TYPES, implicit_reward_margin, preference_loss
from lightning_refdpo.timesteps import inverse_sqrt_snr, reward_scale_schedule

# The frozen VAE, text encoder and UNet copies stay in eval mode on purpose (see ``train``).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ATTENTION = ("sdpa", "xformers", "eager")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DiffusionDPOModule(LightningModule):
    """Diffusion-DPO and its reference-update / timestep-aware variants for SD1.5-style models.

    Args:
        pretrained_model_name_or_path: hub id or local folder in the diffusers layout (``unet``,
            ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``). A local folder is stored as an
            absolute path (hyperparameters, checkpoints), so exports and evaluations of a checkpoint
            work from any directory.
        revision, variant: passed to every ``from_pretrained`` (e.g. ``variant="fp16"``).
        vae_name_or_path: a VAE to use instead of the model's own (a hub id or folder holding an
            ``AutoencoderKL``), e.g. ``madebyollin/sdxl-vae-fp16-fix``, the SDXL VAE that does not
            overflow in fp16; ``None`` keeps the model's ``vae`` subfolder.
        loss_type: ``sigmoid`` (Diffusion-DPO), ``ipo``, ``hinge``, ``robust`` or ``sft``.
        beta: KL strength of DPO on the margin ``h`` that keeps the 0.5 (5000 for SD1.5 and SDXL).
        label_smoothing: conservative / robust DPO ``eps``.
        ipo_tau: IPO regularization (``losses.DEFAULT_IPO_TAU``).
        reward_scale: multiply ``h`` by ``lambda(t) = 1 + norm(1/sqrt(SNR(t)))`` (METHOD.md 3b).
        lora_rank: ``None`` trains the full UNet; an int trains peft LoRA adapters of that rank.
        lora_alpha: LoRA scaling numerator (default: ``lora_rank``).
        lora_target_modules: UNet modules to adapt (default: the attention projections).
        lora_dropout: dropout inside the policy adapter only: the reference adapter has none, so
            reference and initial forwards are deterministic.
        learning_rate: per-pair learning rate; with ``scale_lr`` it is multiplied by the effective
            batch ``batch_size * accumulate_grad_batches * world_size`` (Diffusion-DPO: 1e-8 x 2048).
        lr_scheduler, lr_warmup_steps: a ``diffusers.optimization.get_scheduler`` name and warm-up.
        adam_*: AdamW settings (the Diffusion-DPO script's defaults).
        frozen_dtype: dtype of the frozen reference/initial UNet copies in full fine-tuning
            (``bfloat16`` halves their memory on GPU); ``None`` keeps the policy's dtype. A reference
            in 16 bits cannot take a soft update (``ReferenceModelUpdate.alpha < 1``): steps below its
            rounding would vanish, so the combination is refused.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        attention: UNet attention processor: ``sdpa`` (PyTorch scaled-dot-product attention, which
            picks flash / memory-efficient kernels on GPU), ``xformers`` or ``eager``.
        channels_last: UNets in channels-last memory format (faster convolutions on recent GPUs).
        compile_unet: ``torch.compile`` the UNets (``nn.Module.compile``: state-dict keys unchanged).
        validation_seed: seed of the timesteps and noise of validation, fixed so epochs compare.
        max_nonfinite_steps: a step whose loss is NaN or infinite on any rank is skipped on every
            rank (no update) and counted in ``train/nonfinite_steps``; this many in a row stop the
            run with :class:`NonFiniteLossError` (the CLI then saves ``on_exception.ckpt``).
        max_skipped_share: stop with :class:`UndecodablePairsError` at the end of an epoch (or of
            training) when more than this share of the training pairs loaded so far, over all ranks,
            could not be decoded, instead of training on what is left (or on nothing).
    """

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
        reward_scale: bool = False,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        lora_dropout: float = 0.0,
        learning_rate: float = 1e-8,
        scale_lr: bool = True,
        lr_scheduler: str = "constant_with_warmup",
        lr_warmup_steps: int = 0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_weight_decay: float = 1e-2,
        adam_epsilon: float = 1e-8,
        frozen_dtype: str | None = None,
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
        channels_last: bool = False,
        compile_unet: bool = False,
        validation_seed: int = 0,
        max_nonfinite_steps: int = 5,
        max_skipped_share: float = 0.5,
    ) -> None:
        super().__init__()
        if max_nonfinite_steps < 1:
            raise ValueError(f"model.max_nonfinite_steps must be >= 1; got {max_nonfinite_steps}")
        if not 0.0 <= max_skipped_share <= 1.0:
            raise ValueError(f"model.max_skipped_share must be in [0, 1]; got {max_skipped_share}")
        _check_config(
            loss_type, beta, label_smoothing, ipo_tau, lora_rank, learning_rate, frozen_dtype, attention
        )
        self.save_hyperparameters()
        for key in ("pretrained_model_name_or_path", "vae_name_or_path"):
            self.hparams[key] = absolute_if_local(self.hparams[key])
        self.load_components()
        self.register_buffer("reward_scales", self.reward_scale_schedule(), persistent=False)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        if self.uses_lora:
            lora.add_policy_and_reference(
                self.unet,
                rank=lora_rank,
                alpha=lora_alpha if lora_alpha is not None else lora_rank,
                target_modules=lora_target_modules,
                dropout=lora_dropout,
            )
        else:
            dtype = _DTYPES[frozen_dtype] if frozen_dtype else None
            self.reference_unet = _frozen_copy(self.unet, dtype)
            self.initial_unet = _frozen_copy(self.unet, dtype)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        for unet in self.unets():
            _configure_unet(unet, attention, channels_last, compile_unet)
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self.pairs_loaded = self.pairs_skipped = 0
        self.train()
        # Frozen parts (VAE, text encoder, initial UNet, LoRA base weights) reload from the model id.
        self.strict_loading = False

    # ------------------------------------------------------------------ models
    def load_components(self) -> None:
        """Load the pipeline components by model id. Override to add components (SDXL)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kwargs = {"revision": self.hparams.revision}
        weights = {**kwargs, "variant": self.hparams.variant}
        path = self.hparams.pretrained_model_name_or_path
        self.noise_scheduler = load_component(DDPMScheduler, path, "scheduler", **kwargs)
        self.tokenizer = load_component(CLIPTokenizer, path, "tokenizer", **kwargs)
        self.text_encoder = load_component(CLIPTextModel, path, "text_encoder", **weights)
        if self.hparams.vae_name_or_path:
            self.vae = load_component(AutoencoderKL, self.hparams.vae_name_or_path)
        else:
            self.vae = load_component(AutoencoderKL, path, "vae", **weights)
        self.unet = load_component(UNet2DConditionModel, path, "unet", **weights)

    @property
    def uses_lora(self) -> bool:
        return self.hparams.lora_rank is not None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def reward_scale_schedule(self) -> torch.Tensor:
        """``lambda(t)`` for every training timestep (``timesteps.reward_scale_schedule``). For a
        zero-terminal-SNR scheduler (``rescale_betas_zero_snr``), ``1/sqrt(SNR)`` is infinite at
        ``T-1`` and explodes near it; it is clipped at the largest value of the same scheduler
        without the rescaling, so ``lambda`` matches that schedule's wherever the two agree in
        range and is 2 on the noisiest steps."""
        config = self.noise_scheduler.config
        cap = None
        if config.get("rescale_betas_zero_snr"):
            plain = type(self.noise_scheduler).from_config(config, rescale_betas_zero_snr=False)
            cap = float(inverse_sqrt_snr(plain.alphas_cumprod).max())
        return reward_scale_schedule(self.noise_scheduler.alphas_cumprod, max_inverse_sqrt_snr=cap)

    def unets(self) -> list[torch.nn.Module]:
        """Every distinct UNet held: the policy, and in full fine-tuning the two frozen copies."""
        return [self.unet] if self.uses_lora else [self.unet, self.reference_unet, self.initial_unet]

    def frozen_modules(self) -> list[torch.nn.Module]:
        modules = [self.vae, self.text_encoder]
        if not self.uses_lora:
            modules += [self.reference_unet, self.initial_unet]
        return modules

    def train(self, mode: bool = True) -> DiffusionDPOModule:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    @contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        """The reference UNet for a no-grad forward."""
        if self.uses_lora:
            with lora.use_adapter(self.unet, lora.REFERENCE):
                yield self.unet
        else:
            yield self.reference_unet

    @contextmanager
    def initial_model(self) -> Iterator[torch.nn.Module]:
        """The initial (pretrained) UNet for a no-grad forward."""
        if self.uses_lora:
            with lora.use_adapter(self.unet, None):
                yield self.unet
        else:
            yield self.initial_unet

    def build_pipeline(self, unet: torch.nn.Module | None = None) -> Any:
        """A diffusers ``StableDiffusionPipeline`` over this module's components and ``unet``
        (default: the policy; pass the UNet of :meth:`initial_model` for the base model)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet if unet is None else unet,
            scheduler=type(self.noise_scheduler).from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def latent_distribution(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior ``q(z | x)`` of images in ``[-1, 1]`` (what the latent
        cache stores)."""
        dist = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, noise_seeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``z = (mean + std * eps) * scaling_factor``, the draw of ``latent_dist.sample()``, shared
        by cached and uncached training so both consume the RNG alike. ``mean`` holds the winners,
        then the losers; with ``noise_seeds`` (training) pair ``i`` draws its winner's and loser's
        ``eps`` from its own seed (``data/draws.py``), else ``eps`` comes from the global RNG."""
        if noise_seeds is None:
            # randn_like would copy the strides of the VAE's non-contiguous ``mean`` view and place
            # the same draws differently from a cached (contiguous) mean.
            eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
        else:
            eps = pair_normal(noise_seeds, LATENT_STREAM, (2, *mean.shape[1:])).transpose(0, 1)
            eps = eps.reshape(mean.shape).to(mean)
        return (mean + std * eps) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """UNet conditioning for ``captions``: ``{"encoder_hidden_states": ...}`` (one row each)."""
        return {"encoder_hidden_states": self.text_encoder(self.token_ids(self.tokenizer, captions))[0]}

    def token_ids(self, tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
        """``captions`` tokenized, padded and truncated to the tokenizer's ``model_max_length``."""
        return tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_batch(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Winner latents, loser latents and the prompt conditioning of a preference batch, from
        pixels and captions, from latents shipped with the pairs (``latents_w``, ``latents_l``: exact,
        no posterior draw) or from a latent cache (``latents_mean_w``, ..., ``encoder_hidden_states``)."""
        if "latents_mean_w" in batch:
            mean = torch.cat([batch["latents_mean_w"], batch["latents_mean_l"]])
            std = torch.cat([batch["latents_std_w"], batch["latents_std_l"]])
            cond = {"encoder_hidden_states": batch["encoder_hidden_states"]}
        elif "latents_w" in batch:
            mean = torch.cat([batch["latents_w"], batch["latents_l"]]).to(self.device)
            std = torch.zeros_like(mean)
            cond = self.encode_prompts(batch["caption"])
        else:
            pixels = batch["pixel_values"]
            mean, std = self.latent_distribution(torch.cat([pixels[:, :3], pixels[:, 3:]]))
            cond = self.encode_prompts(batch["caption"])
        latents_w, latents_l = self.sample_latents(mean, std, batch.get("noise_seeds")).chunk(2)
        return latents_w, latents_l, cond

    def pair_conditioning(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditioning of the batched forward over winners then losers, from the per-pair
        ``cond`` of :meth:`encode_batch`: each pair's conditioning for both of its images."""
        return {k: torch.cat([v, v]) for k, v in cond.items()}

    # ------------------------------------------------------------------ diffusion
    def diffusion_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported scheduler prediction_type {self.prediction_type!r}")

    def predict(
        self,
        unet: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        dtype = next(unet.parameters()).dtype
        cond = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in cond.items()}
        return unet(noisy.to(dtype), timesteps, **cond).sample

    def prediction_error(self, model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample ``mean ||target - pred||^2`` over latent elements (override to change it)."""
        return (model_pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, target.ndim)))

    def preference_step(
        self,
        batch: dict[str, Any],
        timesteps: torch.Tensor,
        generator: torch.Generator | None = None,
        against_initial: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Per-pair loss, margin ``h`` and prediction errors of a preference batch at ``timesteps``;
        with ``against_initial`` also ``initial_margin``, the margin with the initial model as the
        reference (one more no-grad forward).

        The policy sees winners and losers in one batched forward, the reference in one no-grad
        forward; both share ``t`` and the noise within a pair. Noise comes from ``generator`` when
        given (validation, analysis), else from each pair's ``noise_seeds`` (training batches, see
        ``data/draws.py``), else from the global RNG.
        """
        latents_w, latents_l, cond = self.encode_batch(batch)
        latents = torch.cat([latents_w, latents_l])
        if generator is not None:
            noise = torch.randn(latents_w.shape, generator=generator).to(latents_w)
        elif "noise_seeds" in batch:
            noise = pair_normal(batch["noise_seeds"], NOISE_STREAM, latents_w.shape[1:]).to(latents_w)
        else:
            noise = torch.randn_like(latents_w)
        noise = noise.repeat(2, 1, 1, 1)
        timesteps = timesteps.to(self.device).repeat(2)
        cond = self.pair_conditioning(cond)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.diffusion_target(latents, noise, timesteps)

        with torch.no_grad(), self.reference_model() as reference:
            ref_mse_w, ref_mse_l = self.prediction_error(
                self.predict(reference, noisy, timesteps, cond), target
            ).chunk(2)
        model_mse_w, model_mse_l = self.prediction_error(
            self.predict(self.unet, noisy, timesteps, cond), target
        ).chunk(2)

        weights = self.reward_scales[timesteps[: len(model_mse_w)]] if self.hparams.reward_scale else None
        extra = {}
        if against_initial:
            with torch.no_grad(), self.initial_model() as initial:
                init_mse = self.prediction_error(self.predict(initial, noisy, timesteps, cond), target)
            init_mse_w, init_mse_l = init_mse.chunk(2)
            extra["initial_margin"] = implicit_reward_margin(
                model_mse_w, model_mse_l, init_mse_w, init_mse_l, weights
            ).detach()
        losses = preference_loss(
            model_mse_w,
            model_mse_l,
            ref_mse_w,
            ref_mse_l,
            beta=self.hparams.beta,
            loss_type=self.hparams.loss_type,
            weights=weights,
            label_smoothing=self.hparams.label_smoothing,
            ipo_tau=self.hparams.ipo_tau,
        )
        return {
            "loss": losses,
            "reward_margin": implicit_reward_margin(
                model_mse_w, model_mse_l, ref_mse_w, ref_mse_l, weights
            ).detach(),
            "mse_w": model_mse_w.detach(),
            "mse_l": model_mse_l.detach(),
            "ref_mse_w": ref_mse_w,
            "ref_mse_l": ref_mse_l,
            **extra,
        }

    @staticmethod
    def summarize(per_pair: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch means of :meth:`preference_step` (the loss averaged *after* the log-sigmoid) and
        the implicit accuracy ``mean(h > 0)`` with ties ``h == 0`` counted as 1/2: a reference just
        copied from the policy gives ``h = 0`` exactly, which is a coin flip, not a miss. With
        ``initial_margin``, also ``implicit_acc_initial`` against the initial model."""
        figures = {k: v.mean() for k, v in per_pair.items()}
        figures["implicit_acc"] = implicit_accuracy(per_pair["reward_margin"])
        if "initial_margin" in per_pair:
            figures["implicit_acc_initial"] = implicit_accuracy(per_pair["initial_margin"])
        return figures

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        sampler = getattr(self.trainer.datamodule, "timestep_sampler", None) if self.trainer else None
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        if sampler is not None and sampler.num_train_timesteps != num_train_timesteps:
            raise ValueError(
                f"data.timestep_sampler.num_train_timesteps is {sampler.num_train_timesteps} but the model's "
                f"scheduler has {num_train_timesteps}; set data.init_args.timestep_sampler.init_args."
                f"num_train_timesteps: {num_train_timesteps}"
            )

    def on_fit_start(self) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if isinstance(self.trainer.strategy, FSDPStrategy) and self.uses_lora:
            raise ValueError(
                "model.lora_rank with FSDPStrategy is not supported (the policy and reference adapters "
                "share FSDP units, so the reference update cannot copy shard to shard); LoRA adapters "
                "are small: use trainer.strategy: ddp"
            )
        if self.uses_lora:
            return
        pairs = zip(self.reference_unet.parameters(), self.unet.parameters(), strict=True)
        if any(ref.shape != policy.shape for ref, policy in pairs):
            raise ValueError(
                "the reference UNet is sharded unlike the policy UNet; with FSDPStrategy add "
                "diffusers.UNet2DConditionModel to trainer.strategy.init_args.auto_wrap_policy (see "
                "configs/sdxl_refdpo_fsdp.yaml)"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.pairs_skipped += int(batch.get("num_skipped", 0))
        self.pairs_loaded += int(batch.get("num_skipped", 0)) + len(batch["caption"])
        if batch.get("num_skipped"):
            self.log(
                "train/skipped_pairs",
                float(batch["num_skipped"]),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
            )
        if self.on_any_rank(not batch["caption"]):  # all pairs undecodable: every rank skips, as DDP needs
            return None
        out = self.summarize(self.preference_step(batch, batch["timesteps"]))
        if self.skip_nonfinite(out["loss"]):
            return None
        self._log_figures("train", out, len(batch["caption"]), on_step=True, sync_dist=True)
        return out["loss"]

    def on_train_epoch_end(self) -> None:
        self.check_skipped_pairs()

    def on_train_end(self) -> None:
        self.check_skipped_pairs()

    def check_skipped_pairs(self) -> None:
        """Report the undecodable training pairs on the console and stop with
        :class:`UndecodablePairsError` when they exceed ``max_skipped_share`` of the pairs loaded
        (counts summed over ranks, so every rank decides alike)."""
        counts = torch.tensor(
            [self.pairs_skipped, self.pairs_loaded], dtype=torch.float64, device=self.device
        )
        skipped, loaded = (int(x) for x in self.trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        if not skipped:
            return
        message = f"{skipped} of {loaded} training pairs could not be decoded and were skipped"
        if skipped > self.hparams.max_skipped_share * loaded:
            raise UndecodablePairsError(
                f"{message}: more than model.max_skipped_share={self.hparams.max_skipped_share} of them. "
                "Check the image columns (jpg_0, jpg_1) of the training data."
            )
        rank_zero_warn(f"{message} (train/skipped_pairs)")

    def skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether to skip this step: the loss is non-finite on at least one rank (decided on the
        count summed over ranks, so every rank skips together). Raises after
        ``max_nonfinite_steps`` skipped steps in a row."""
        if not self.on_any_rank(~torch.isfinite(loss.detach())):
            self.nonfinite_in_a_row = 0
            return False
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
        if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"the loss was NaN or infinite in {self.nonfinite_in_a_row} training steps in a row (step "
                f"{self.global_step}); stopping. Lower model.learning_rate or model.beta, check the data, or "
                "use frozen_dtype/precision with more range (bf16 or fp32)."
            )
        return True

    def on_any_rank(self, flag: bool | torch.Tensor) -> bool:
        """Whether ``flag`` holds on at least one rank: one value summed over ranks, the same on all."""
        flag = torch.as_tensor(flag, dtype=torch.float32, device=self.device)
        return float(self.trainer.strategy.reduce(flag, reduce_op="sum")) > 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.hparams.validation_seed + batch_idx)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (len(batch["caption"]),), generator=generator)
        out = self.summarize(
            self.preference_step(batch, timesteps, generator=generator, against_initial=True)
        )
        self._log_figures("val", out, len(batch["caption"]), on_step=False, sync_dist=True)
        return out["loss"]

    def _log_figures(self, stage: str, out: dict[str, torch.Tensor], batch_size: int, **kwargs: Any) -> None:
        shown = ("loss", "implicit_acc")
        for keys, prog_bar in ((shown, True), (out.keys() - set(shown), False)):
            figures = {f"{stage}/{k}": out[k].detach() for k in keys}
            self.log_dict(figures, batch_size=batch_size, on_epoch=True, prog_bar=prog_bar, **kwargs)

    def configure_optimizers(self) -> dict[str, Any]:
        from diffusers.optimization import get_scheduler

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
        params = [p for p in self.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=lr,
            betas=(hp.adam_beta1, hp.adam_beta2),
            weight_decay=hp.adam_weight_decay,
            eps=hp.adam_epsilon,
        )
        total = self.trainer.estimated_stepping_batches
        scheduler = get_scheduler(
            hp.lr_scheduler,
            optimizer,
            num_warmup_steps=hp.lr_warmup_steps,
            num_training_steps=int(total) if math.isfinite(total) else None,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ reference model
    @torch.no_grad()
    def update_reference(self, alpha: float = 1.0) -> None:
        """``ref <- (1 - alpha) ref + alpha theta``; ``alpha = 1`` is the hard copy of TR-DPO.

        With LoRA only ``alpha = 1`` is exact (a mix of ``A`` and ``B`` factors is not the mix of
        ``B @ A``), so any other value is refused.
        """
        if self.uses_lora:
            if alpha != 1.0:
                raise ValueError(
                    f"a soft reference update (alpha={alpha}) is not exact with LoRA; use alpha=1.0"
                )
            lora.copy_adapter(self.unet, lora.POLICY, lora.REFERENCE)
            return
        for ref, policy in zip(self.reference_unet.parameters(), self.unet.parameters(), strict=True):
            ref.lerp_(policy.to(ref.dtype), alpha)

    @torch.no_grad()
    def reset_reference(self) -> None:
        """``ref <- init`` (the "Re-Init" ablation)."""
        if self.uses_lora:
            lora.zero_adapter(self.unet, lora.REFERENCE)
        else:
            self.reference_unet.load_state_dict(self.initial_unet.state_dict())

    def reference_state(self) -> dict[str, torch.Tensor]:
        """A copy of the reference weights in CPU memory (to undo a rejected update without a second
        reference on the accelerator)."""
        if self.uses_lora:
            state = lora.adapter_parameters(self.unet, lora.REFERENCE)
        else:
            state = self.reference_unet.state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    @property
    def reference_dtype(self) -> torch.dtype:
        """The dtype the reference weights are stored in."""
        if self.uses_lora:
            return next(iter(lora.adapter_parameters(self.unet, lora.REFERENCE).values())).dtype
        return next(self.reference_unet.parameters()).dtype

    @torch.no_grad()
    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.uses_lora:
            for key, p in lora.adapter_parameters(self.unet, lora.REFERENCE).items():
                p.copy_(state[key])
        else:
            self.reference_unet.load_state_dict(state)

    @torch.no_grad()
    def estimate_divergence(
        self,
        batch: dict[str, Any],
        num_samples: int,
        candidate: str = "policy",
        generator: torch.Generator | None = None,
        sample_seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``D = mean(mse_cand(x^w) - mse_init(x^w))`` on ``num_samples`` winners of ``batch``.

        The forward-process estimate of ``KL(p_cand || p_init)`` of arXiv 2505.18736 (Eq. 8) with
        the constant timestep weighting of Diffusion-DPO, with ``t ~ U{0..T-1}`` and noise drawn for
        each winner: winner ``i`` draws from a generator seeded with ``sample_seeds[i]`` when given
        (the same draws wherever the winner is, see ``ReferenceModelUpdate``), else all from
        ``generator``. ``candidate`` is ``"policy"`` or ``"reference"``.
        """
        n = min(num_samples, len(batch["caption"]))
        subset = {k: v[:n] for k, v in batch.items() if isinstance(v, torch.Tensor | list)}
        latents, _, cond = self.encode_batch(subset)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        generators = (
            [torch.Generator().manual_seed(int(seed)) for seed in sample_seeds[:n]]
            if sample_seeds is not None
            else [generator] * n
        )
        timesteps = torch.stack([torch.randint(0, num_timesteps, (), generator=g) for g in generators])
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
        timesteps, noise = timesteps.to(self.device), noise.to(latents)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self.diffusion_target(latents, noise, timesteps)
        candidate_model = self.reference_model() if candidate == "reference" else nullcontext(self.unet)
        with candidate_model as unet:
            mse_candidate = self.prediction_error(self.predict(unet, noisy, timesteps, cond), target)
        with self.initial_model() as unet:
            mse_init = self.prediction_error(self.predict(unet, noisy, timesteps, cond), target)
        return (mse_candidate - mse_init).mean()

    # ------------------------------------------------------------------ checkpoints
    def trainable_and_reference_keys(self) -> list[str]:
        """State-dict keys a checkpoint must hold: everything but the frozen, reloadable parts."""
        keys = []
        for key in self.state_dict():
            if key.startswith(("vae.", "text_encoder.", "initial_unet.")):
                continue
            if self.uses_lora and key.startswith("unet.") and "lora_" not in key:
                continue
            keys.append(key)
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["rng_states"] = _torch_rng_states()
        checkpoint["nonfinite_steps"] = (self.nonfinite_steps, self.nonfinite_in_a_row)
        checkpoint["logger_version"] = self.logger.version if self.logger is not None else None
        keep = set(self.trainable_and_reference_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = [k for k in self.trainable_and_reference_keys() if k not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(
                f"checkpoint lacks {len(missing)} policy/reference weights (first: {missing[0]}); was it "
                "written with the same lora_rank and lora_target_modules?"
            )
        if "rng_states" in checkpoint and self._trainer is not None:  # resuming a fit
            torch.set_rng_state(checkpoint["rng_states"]["torch"])
            if checkpoint["rng_states"]["torch.cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["rng_states"]["torch.cuda"])
            self.nonfinite_steps, self.nonfinite_in_a_row = checkpoint["nonfinite_steps"]


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` training steps in a row had a NaN or infinite loss."""


class UndecodablePairsError(RuntimeError):
    """Raised when more than ``max_skipped_share`` of the training pairs could not be decoded."""


def implicit_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """``mean(h > 0)`` with ties ``h == 0`` counted as 1/2."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


def absolute_if_local(name_or_path: str | None) -> str | None:
    """``name_or_path`` as an absolute path when it names an existing local folder, else unchanged
    (a hub id)."""
    if name_or_path is None or not Path(name_or_path).expanduser().is_dir():
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())


def _torch_rng_states() -> dict[str, Any]:
    """The global torch CPU and CUDA generator states, as tensors (a checkpoint that Lightning's
    ``weights_only`` loading accepts). The data draws no global randomness (``data/draws.py``);
    these cover what the model draws from it, e.g. LoRA dropout."""
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _frozen_copy(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    frozen = copy.deepcopy(module).requires_grad_(False).eval()
    return frozen.to(dtype) if dtype is not None else frozen


def _check_config(
    loss_type: str,
    beta: float,
    label_smoothing: float,
    ipo_tau: float,
    lora_rank: int | None,
    learning_rate: float,
    frozen_dtype: str | None,
    attention: str,
) -> None:
    """Refuse impossible settings before any weights load (NaN and infinities included)."""
    numbers = {
        "beta": beta,
        "learning_rate": learning_rate,
        "label_smoothing": label_smoothing,
        "ipo_tau": ipo_tau,
    }
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise ValueError(f"model.{name} must be a finite number; got {value}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"model.loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"model.beta must be > 0 (Diffusion-DPO uses 5000); got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"model.label_smoothing must be in [0, 0.5); got {label_smoothing}")
    if ipo_tau <= 0:
        raise ValueError(f"model.ipo_tau must be > 0; got {ipo_tau}")
    if lora_rank is not None and lora_rank < 1:
        raise ValueError(f"model.lora_rank must be >= 1, or null for full fine-tuning; got {lora_rank}")
    if learning_rate <= 0:
        raise ValueError(f"model.learning_rate must be > 0; got {learning_rate}")
    if frozen_dtype is not None and frozen_dtype not in _DTYPES:
        raise ValueError(
            f"model.frozen_dtype must be one of {', '.join(_DTYPES)} or null; got {frozen_dtype!r}"
        )
    if attention not in ATTENTION:
        raise ValueError(f"model.attention must be one of {', '.join(ATTENTION)}; got {attention!r}")


def _configure_unet(unet: torch.nn.Module, attention: str, channels_last: bool, compile_unet: bool) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile()
