"""Sampler settings, the pipelines of both sides of a comparison, and image generation.

Both sides of a comparison come from one code path (:func:`comparison_pipelines`): the model's
pipeline, and for the baseline the same pipeline class over the same components (VAE, text
encoders, tokenizers, scheduler, safety checker) with the baseline's UNet, in one dtype, with the
safety checker off on both sides (or on for both) and never a watermark. A hub-id baseline loaded
as its own pipeline would bring SD1.5's safety checker (black images on the baseline side only),
SDXL's watermark or another VAE, and bias every win rate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

#: the paper's samplers per model family (Diffusion-DPO's evaluations and sampling notebook);
#: ``scheduler: None`` keeps the pipeline's own (the base model's ``scheduler/`` config)
SAMPLERS = {
    "sd15": {"num_inference_steps": 50, "guidance_scale": 7.5, "scheduler": "DDIMScheduler"},
    "sdxl": {"num_inference_steps": 50, "guidance_scale": 5.0, "scheduler": None},
    "sd3": {"num_inference_steps": 40, "guidance_scale": 4.5, "scheduler": None},
}
"""The evaluation samplers: Diffusion-DPO's for SD1.5 and SDXL; for SD3 the SD3.5 Medium model
card's (40 steps, guidance 4.5, its own flow-matching Euler scheduler)."""


@dataclass
class GenerationConfig:
    """Sampler settings; the defaults are those of the Diffusion-DPO evaluations of SD1.5
    (:data:`SAMPLERS` holds SDXL's). ``scheduler``: a diffusers scheduler class name, or ``None``
    for the pipeline's own."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None
    scheduler: str | None = "DDIMScheduler"
    batch_size: int = 8


def model_family(pipeline: Any) -> str:
    """``"sd3"`` for a pipeline with a transformer, ``"sdxl"`` for one with a second text encoder,
    else ``"sd15"``."""
    if "transformer" in pipeline.components:
        return "sd3"
    return "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd15"


def sampler_config(
    pipeline: Any, resolution: int | None = None, batch_size: int = 8, **overrides: Any
) -> GenerationConfig:
    """The paper's sampler of ``pipeline``'s family (:data:`SAMPLERS`), with the ``overrides`` that
    are not ``None`` (``scheduler="default"``: the pipeline's own)."""
    settings = {**SAMPLERS[model_family(pipeline)], **{k: v for k, v in overrides.items() if v is not None}}
    if settings["scheduler"] == "default":
        settings["scheduler"] = None
    return GenerationConfig(resolution=resolution, batch_size=batch_size, **settings)


def evaluation_items(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    return [(prompt, seed) for prompt in prompts for seed in seeds]


def item_batches(num_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """Process ``rank``'s batches of the fixed partition of items ``0 .. num_items - 1``: batch ``k``
    holds items ``k * batch_size .. (k + 1) * batch_size - 1`` whatever the number of processes or
    where a run resumes, and process ``rank`` of ``world_size`` takes batches ``rank, rank +
    world_size, ...``. An image depends on the batch it is generated in (another batch shape rounds
    differently, on CPU as on GPU), so with the batches fixed a resumed or sharded evaluation
    generates every item exactly as one uninterrupted process does."""
    starts = range(0, num_items, batch_size)[rank::world_size]
    return [range(start, min(start + batch_size, num_items)) for start in starts]


def with_scheduler(pipeline, name: str | None):
    """``pipeline`` with its scheduler replaced by the diffusers class ``name`` (same config);
    unchanged when ``name`` is ``None``."""
    import diffusers

    if name is not None and type(pipeline.scheduler).__name__ != name:
        pipeline.scheduler = getattr(diffusers, name).from_config(pipeline.scheduler.config)
    return pipeline


@torch.no_grad()
def generate(
    pipeline, items: Sequence[tuple[str, int]], config: GenerationConfig, output_type: str = "pt"
) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in ``[0, 1]``, one per (prompt, seed) item, each from its own generator;
    ``output_type="latent"``: the sampler's final latents instead (scaled, before the VAE decoder)."""
    pipeline = with_scheduler(pipeline, config.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    size = {"height": config.resolution, "width": config.resolution} if config.resolution else {}
    images = []
    for start in range(0, len(items), config.batch_size):
        chunk = items[start : start + config.batch_size]
        generators = [torch.Generator(pipeline.device).manual_seed(seed) for _, seed in chunk]
        out = pipeline(
            prompt=[prompt for prompt, _ in chunk],
            generator=generators,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            output_type=output_type,
            **size,
        )
        images.append(out.images.float().cpu())
    return torch.cat(images)


def load_pipeline(
    model: str, device: str, base_model: str | None = None, unsafe_unpickle: bool = False
) -> tuple[object, object | None]:
    """A pipeline for ``model``: a Lightning checkpoint (the policy with the base model's own
    scheduler; the module comes back as the second value, for its initial model), an export folder
    of ``lightning-refdpo export`` or a diffusers pipeline folder / hub id (second value ``None``).
    ``base_model`` replaces the base model that a checkpoint or export names; a checkpoint is
    loaded weights-only unless ``unsafe_unpickle`` (``lightning_refdpo.checkpoint.load_checkpoint``)."""
    from lightning_refdpo.sources import checkpoint_pipeline, pipeline_from_export

    if model.endswith(".ckpt"):
        return checkpoint_pipeline(model, base_model, unsafe_unpickle, device)
    return pipeline_from_export(model, base_model=base_model).to(device), None


@contextmanager
def in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[torch.nn.Module]:
    """``module`` cast to ``dtype`` for the duration, then back (bf16 -> fp32 -> bf16 is exact):
    a frozen bf16 UNet generates in the policy's dtype, as the policy does."""
    original = next(module.parameters()).dtype
    module.to(dtype)
    try:
        yield module
    finally:
        module.to(original)


def denoiser_name(pipeline: Any) -> str:
    """The pipeline's denoiser component: ``transformer`` (SD3) or ``unet``."""
    return "transformer" if "transformer" in pipeline.components else "unet"


def same_components(pipeline: Any, denoiser: torch.nn.Module) -> Any:
    """A pipeline of ``pipeline``'s class over its components (VAE, text encoders, tokenizers,
    scheduler, safety checker, ...) with ``denoiser`` instead of its own, without the watermark."""
    other = type(pipeline)(**{**pipeline.components, denoiser_name(pipeline): denoiser})
    if hasattr(other, "watermark"):
        other.watermark = None
    if "requires_safety_checker" in pipeline.config:
        other.register_to_config(requires_safety_checker=pipeline.config.requires_safety_checker)
    return other


def set_safety_checker(pipeline: Any, module: Any, enabled: bool) -> None:
    """Remove the safety checker from an SD1.5 pipeline, or with ``enabled`` make sure it has one
    (loaded from the checkpoint's base model when the pipeline lacks it)."""
    from diffusers import StableDiffusionPipeline

    if not isinstance(pipeline, StableDiffusionPipeline):
        if enabled:
            raise ValueError(f"{type(pipeline).__name__} has no safety checker; use safety_checker: false")
        return
    if not enabled:
        pipeline.register_modules(safety_checker=None)
        pipeline.register_to_config(requires_safety_checker=False)
        return
    if pipeline.safety_checker is None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        from lightning_refdpo.hub import load_component

        if module is None:
            raise ValueError("safety_checker: true needs a model pipeline that has one, or a checkpoint")
        base = module.hparams.pretrained_model_name_or_path
        pipeline.register_modules(
            safety_checker=load_component(StableDiffusionSafetyChecker, base, "safety_checker"),
            feature_extractor=load_component(CLIPImageProcessor, base, "feature_extractor"),
        )
    pipeline.register_to_config(requires_safety_checker=True)


def comparison_pipelines(
    model: str,
    baseline: str | None,
    device: str | torch.device,
    dtype: torch.dtype,
    safety_checker: bool = False,
    base_model: str | None = None,
    unsafe_unpickle: bool = False,
) -> dict[str, Callable[[], AbstractContextManager[Any]]]:
    """``{"model": side, "baseline": side}``: ``with side() as pipeline`` gives a pipeline of the
    comparison, both built alike (see the module docstring), in ``dtype`` on ``device``.

    ``baseline`` is a pipeline folder / hub id, an export folder or a checkpoint, of which only the
    UNet is used; ``None`` takes the initial model of the checkpoint ``model``. Use one side at a
    time: with LoRA the baseline is the policy's UNet with its adapters off. ``base_model``
    replaces the base model that the checkpoint or export ``model`` names; checkpoints are loaded
    weights-only unless ``unsafe_unpickle`` (see :func:`load_pipeline`).
    """
    pipeline, module = load_pipeline(model, str(device), base_model, unsafe_unpickle)
    if baseline is None and module is None:
        raise ValueError("evaluate needs --baseline when --model is not a training checkpoint")
    set_safety_checker(pipeline, module, safety_checker)
    if hasattr(pipeline, "watermark"):
        pipeline.watermark = None
    pipeline.to(device=device, dtype=dtype)

    @contextmanager
    def model_side() -> Iterator[Any]:
        yield pipeline

    @contextmanager
    def baseline_side() -> Iterator[Any]:
        if baseline is not None:
            other = load_pipeline(baseline, str(device), unsafe_unpickle=unsafe_unpickle)[0]
            yield same_components(pipeline, getattr(other, denoiser_name(other)).to(dtype))
            return
        with module.reference.initial(module.policy) as denoiser:
            yield same_components(pipeline, denoiser.to(dtype))

    return {"model": model_side, "baseline": baseline_side}
