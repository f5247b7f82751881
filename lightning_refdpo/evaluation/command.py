"""``lightning-refdpo evaluate``: the paper's evaluation of a model against a baseline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from lightning_refdpo.evaluation.generation import (
    comparison_pipelines,
    evaluation_items,
    sampler_config,
    with_scheduler,
)
from lightning_refdpo.evaluation.report import results_table, summarize
from lightning_refdpo.evaluation.scoring import paper_scorers
from lightning_refdpo.evaluation.streaming import stream_scores
from lightning_refdpo.metrics import RewardScore
from lightning_refdpo.prompts import load_prompt_groups


def evaluate_model(
    model: str,
    scorers: list[RewardScore] | None = None,
    baseline: str | None = None,
    prompt_sets: list[str] = ["pickapic_v2_test"],  # noqa: B006 - jsonargparse reads the default
    seeds: list[int] = [0, 1, 2, 3, 4],  # noqa: B006
    max_prompts: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    scheduler: str | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    safety_checker: bool = False,
    save_images: bool = False,
    device: str = "auto",
    devices: int = 1,
    num_bootstrap: int = 1000,
    output: str = "evaluation",
    base_model: str | None = None,
    unsafe_unpickle: bool = False,
) -> dict:
    """Score ``model`` against ``baseline`` on each prompt set; write ``results.json`` and ``results.md``.

    Images are generated, scored and dropped a batch at a time; each side's scores go to an index
    under ``output/runs/`` as they come (with ``save_images`` the PNGs too), and a run started again
    with the same ``output`` and settings skips what is done. With ``devices > 1`` the batches are
    split over that many processes (Lightning Fabric, DDP) and the scores gathered. Items are
    generated in fixed batches of ``batch_size`` (see
    :func:`~lightning_refdpo.evaluation.generation.item_batches`), so a resumed run and any number of
    processes give the images and results of one uninterrupted process (on the same hardware and
    thread count).

    Args:
        model: a training checkpoint (``.ckpt``), an export folder or a diffusers pipeline folder / hub id.
        scorers: reward metrics (``class_path`` entries: ``lightning_refdpo.metrics.PickScore``, ...);
            default: :func:`~lightning_refdpo.evaluation.paper_scorers`.
        baseline: a pipeline folder / hub id, export folder or checkpoint whose UNet is compared,
            in the model's pipeline (same VAE, text encoders, scheduler); default: the checkpoint's
            initial model.
        prompt_sets: names or files (see ``lightning_refdpo.prompts``); ``hpdv2`` is reported per style.
        seeds: one image per prompt and seed (the paper: 5).
        max_prompts: keep the first N prompts of each set (of each HPDv2 style).
        num_inference_steps: sampler steps; default: the paper's, 50 for SD1.5 and SDXL.
        guidance_scale: classifier-free guidance; default: the paper's, 7.5 for SD1.5, 5.0 for SDXL.
        scheduler: a diffusers scheduler class name, or ``default`` for the pipeline's own;
            default: the paper's, ``DDIMScheduler`` for SD1.5, the pipeline's own for SDXL.
        resolution: image side in pixels (default: the model's).
        batch_size: images generated and scored at a time: batch ``k`` is items ``k * batch_size ..
            (k + 1) * batch_size - 1``, whatever the number of processes.
        dtype: ``float32``, ``bfloat16`` or ``float16``, for every component of both sides.
        safety_checker: SD1.5's safety checker on both sides (default off on both).
        save_images: also write every image as a PNG beside the index.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...
        devices: number of processes / GPUs.
        num_bootstrap: resamples of the 95 % bootstrap intervals.
        output: folder for ``results.json``, ``results.md`` and ``runs/``.
        base_model: the base model's hub id or folder for ``model``, instead of the one its
            checkpoint or export names (a folder that has moved).
        unsafe_unpickle: unpickle checkpoints whole (``torch.load(weights_only=False)``), which RUNS
            ANY CODE a file holds: only for files you trust. By default a checkpoint is loaded
            weights-only and one holding other objects is refused
            (``lightning_refdpo.checkpoint.load_checkpoint``).
    """
    from lightning.fabric import Fabric

    accelerator, _, index = device.partition(":")
    fabric = Fabric(
        accelerator=accelerator,
        devices=[int(index)] if index else devices,
        strategy="ddp" if devices > 1 else "auto",
    )
    fabric.launch()
    folder = Path(output)
    named = {s.name: s.to(fabric.device) for s in (scorers or paper_scorers())}
    sides = comparison_pipelines(
        model, baseline, fabric.device, getattr(torch, dtype), safety_checker, base_model, unsafe_unpickle
    )
    with sides["model"]() as pipeline:
        config = sampler_config(
            pipeline,
            resolution,
            batch_size,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
        )
        sampler = type(with_scheduler(pipeline, config.scheduler).scheduler).__name__
    results = {
        "model": model,
        "baseline": baseline or "initial model of the checkpoint",
        "seeds": list(seeds),
        "generation": {
            **vars(config),
            "scheduler": sampler,
            "dtype": dtype,
            "safety_checker": safety_checker,
        },
        "scorers": list(named),
    }
    check_run(folder, results, fabric)
    items, groups = {}, {}
    for source in prompt_sets:
        prompts = load_prompt_groups(source, max_prompts)
        items[source] = [item for group in prompts.values() for item in evaluation_items(group, seeds)]
        groups[source] = [name for name, group in prompts.items() for _ in range(len(group) * len(seeds))]
    scores = {}
    for side, pipeline_of in sides.items():
        with pipeline_of() as pipeline:
            for source in prompt_sets:
                records = stream_scores(
                    pipeline,
                    items[source],
                    named,
                    config,
                    folder / "runs" / slug(source) / side,
                    fabric.global_rank,
                    fabric.world_size,
                    save_images,
                    description=f"{side} {source}",
                )
                scores[side, source] = gather(records, list(named), len(items[source]), fabric)
    results["prompt_sets"] = {
        source: {
            "num_prompts": len(items[source]) // len(seeds),
            "num_images": len(items[source]),
            **summarize(scores["model", source], scores["baseline", source], groups[source], num_bootstrap),
        }
        for source in prompt_sets
    }
    if fabric.is_global_zero:
        (folder / "results.json").write_text(json.dumps(results, indent=2))
        (folder / "results.md").write_text(results_table(results))
        print(results_table(results))
    return results


def slug(source: str) -> str:
    """A folder name for a prompt set's name or file."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")


def check_run(folder: Path, settings: dict, fabric) -> None:
    """Record the run's settings in ``folder/run.json``; refuse a folder holding another run's."""
    path = folder / "run.json"
    if path.is_file() and json.loads(path.read_text()) != json.loads(json.dumps(settings)):
        raise ValueError(
            f"{folder} holds an evaluation with other settings ({path}); resume it with the same "
            "arguments or pass another --output"
        )
    fabric.barrier()
    if fabric.is_global_zero:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


def gather(records: dict[int, dict], names: list[str], count: int, fabric) -> dict[str, np.ndarray]:
    """Every rank's records as one array of scores per scorer, in item order."""
    if fabric.world_size > 1:
        shares = [None] * fabric.world_size
        torch.distributed.all_gather_object(shares, records)
        records = {i: record for share in shares for i, record in share.items()}
    return {name: np.array([records[i]["scores"][name] for i in range(count)]) for name in names}
