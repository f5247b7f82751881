"""Generate images for prompts with fixed seeds, score them and compare with a baseline.

Shared by the ``PreferenceEvaluation`` callback and ``lightning-refdpo evaluate``. An evaluation item
is a (prompt, seed) pair; the items are ordered prompt-major, so a model and its baseline produce
paired scores for the win rate (the share of items where the model scores higher).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from lightning_refdpo.metrics import RewardScore, to_pil_images, win_rate


@dataclass
class GenerationConfig:
    """Sampler settings; the defaults are those of the Diffusion-DPO evaluations."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None
    scheduler: str = "DDIMScheduler"
    batch_size: int = 8


def evaluation_items(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    return [(prompt, seed) for prompt in prompts for seed in seeds]


def with_scheduler(pipeline, name: str):
    """``pipeline`` with its scheduler replaced by the diffusers class ``name`` (same config)."""
    import diffusers

    if type(pipeline.scheduler).__name__ != name:
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


def score(
    scorers: dict[str, RewardScore], images: torch.Tensor, prompts: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Per-image scores of every scorer (reset first; gathered across ranks under DDP)."""
    results = {}
    for name, scorer in scorers.items():
        scorer.reset()
        scorer.update(images, list(prompts))
        with scorer.sync_context():
            results[name] = scorer.scores().cpu()
    return results


def compare(
    scores: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Mean of model and baseline and the model's win rate, per scorer."""
    return {
        name: {
            "model_mean": float(scores[name].mean()),
            "baseline_mean": float(baseline[name].mean()),
            "win_rate": win_rate(scores[name], baseline[name]),
        }
        for name in scores
    }


def image_grid(
    images: torch.Tensor | Sequence[Image.Image], captions: Sequence[str], columns: int = 4
) -> Image.Image:
    """A grid of images with each caption written under its image, wrapped between words."""
    pil = to_pil_images(images) if isinstance(images, torch.Tensor) else list(images)
    width, height = pil[0].size
    chars_per_line = max(4, width // 6)
    wrapped = [textwrap.wrap(caption, chars_per_line, break_long_words=False) for caption in captions]
    caption_height = 12 * max(1, *map(len, wrapped)) + 4
    rows = -(-len(pil) // columns)
    grid = Image.new("RGB", (columns * width, rows * (height + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(pil, wrapped, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (height + caption_height)
        grid.paste(image, (x, y))
        draw.text((x + 2, y + height + 2), "\n".join(lines), fill="black")
    return grid


def log_image(trainer, tag: str, image: Image.Image, step: int) -> Path:
    """Log ``image`` to every logger that takes images (W&B-style ``log_image``, TensorBoard) and
    save it as a PNG under the log directory; return the PNG's path."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, np.asarray(image), step, dataformats="HWC")
        elif hasattr(logger, "log_image"):
            logger.log_image(key=tag, images=[image], step=step)
    path = (
        Path(trainer.log_dir or trainer.default_root_dir)
        / "images"
        / f"{tag.replace('/', '_')}_step{step}.png"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def load_pipeline(model: str, device: str) -> tuple[object, object | None]:
    """A pipeline for ``model``: a Lightning checkpoint (the policy; the initial model comes back as
    the second value), an export folder of ``lightning-refdpo export`` or a diffusers pipeline
    folder / hub id (second value ``None``)."""
    from lightning_refdpo.export import load_module, pipeline_from_export

    if model.endswith(".ckpt"):
        module = load_module(model).to(device)
        return module.build_pipeline(), module
    return pipeline_from_export(model).to(device), None


def paper_scorers() -> list[RewardScore]:
    """The five reward models of the paper's tables, with their default hub ids."""
    from lightning_refdpo.metrics import AestheticScore, CLIPScore, HPSv2, ImageReward, PickScore

    return [PickScore(), HPSv2(), CLIPScore(), AestheticScore(), ImageReward()]


def evaluate_model(
    model: str,
    scorers: list[RewardScore] | None = None,
    baseline: str | None = None,
    prompt_sets: list[str] = ["pickapic_v2_test"],  # noqa: B006 - jsonargparse reads the default
    seeds: list[int] = [0, 1, 2, 3, 4],  # noqa: B006
    max_prompts: int | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    scheduler: str = "DDIMScheduler",
    batch_size: int = 8,
    device: str = "auto",
    output: str = "evaluation",
) -> dict:
    """Score ``model`` against ``baseline`` on each prompt set; write ``results.json`` and ``results.md``.

    Args:
        model: a training checkpoint (``.ckpt``) or a diffusers pipeline folder / hub id.
        scorers: reward metrics (``class_path`` entries: ``lightning_refdpo.metrics.PickScore``, ...);
            default: :func:`paper_scorers`.
        baseline: a pipeline folder / hub id or checkpoint; default: the checkpoint's initial model.
        prompt_sets: names or files (see ``lightning_refdpo.prompts``).
        seeds: one image per prompt and seed (the paper: 5).
        max_prompts: keep the first N prompts of each set.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ...
        output: folder for ``results.json`` and ``results.md``.
    """
    from lightning_refdpo.prompts import load_prompts

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    config = GenerationConfig(num_inference_steps, guidance_scale, resolution, scheduler, batch_size)
    named = {type(s).__name__: s.to(device) for s in (scorers or paper_scorers())}
    pipeline, module = load_pipeline(model, device)
    if baseline is None and module is None:
        raise ValueError("evaluate needs --baseline when --model is not a training checkpoint")
    baseline_pipeline = load_pipeline(baseline, device)[0] if baseline is not None else None

    results = {
        "model": model,
        "baseline": baseline or "initial model of the checkpoint",
        "seeds": list(seeds),
    }
    results["generation"] = vars(config)
    results["prompt_sets"] = {}
    for source in prompt_sets:
        prompts = load_prompts(source, max_prompts)
        items = evaluation_items(prompts, seeds)
        captions = [p for p, _ in items]
        model_scores = score(named, generate(pipeline, items, config), captions)
        if baseline_pipeline is not None:
            base_images = generate(baseline_pipeline, items, config)
        else:
            with module.initial_model() as unet:
                base_images = generate(module.build_pipeline(unet), items, config)
        results["prompt_sets"][source] = {
            "num_prompts": len(prompts),
            "num_images": len(items),
            "scores": compare(model_scores, score(named, base_images, captions)),
        }
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    (folder / "results.md").write_text(results_table(results))
    print(results_table(results))
    return results


def results_table(results: dict) -> str:
    """The paper's layout: per prompt set, raw means of baseline and model, then the win rate."""
    lines = []
    for source, entry in results["prompt_sets"].items():
        names = list(entry["scores"])
        lines += [f"### {source} ({entry['num_prompts']} prompts, {entry['num_images']} images)", ""]
        lines += ["| model | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        for label, key in ((results["baseline"], "baseline_mean"), (results["model"], "model_mean")):
            lines.append(f"| {label} | " + " | ".join(f"{entry['scores'][n][key]:.4g}" for n in names) + " |")
        lines.append(
            "| win rate vs baseline | "
            + " | ".join(f"{100 * entry['scores'][n]['win_rate']:.1f}%" for n in names)
            + " |"
        )
        lines.append("")
    return "\n".join(lines)
