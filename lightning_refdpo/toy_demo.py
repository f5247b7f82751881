"""The toy-world demo (``make demo``): align the shipped toy model with the paper's method, measure it.

    python -m lightning_refdpo.toy_demo [--config configs/demo.yaml] [--output outputs/demo]
                                        [CLI overrides, e.g. --trainer.max_steps 50]

1. scores the shipped base model (``assets/toy/model``) on the held-out prompts
   ``lightning_refdpo.data.toy.EVAL_PROMPTS`` (45 prompts, ``--eval-seeds`` seeds each, DDIM,
   fixed seeds) with :class:`~lightning_refdpo.metrics.toy_reward.ToyReward`;
2. trains it on the shipped preference set (``assets/toy/data``) through the normal CLI:
   ``lightning-refdpo fit --config configs/demo.yaml`` (run in this process);
3. scores the aligned policy on the same (prompt, seed) items, prints the mean reward of both,
   the gain and its spread over the evaluation seeds, and the win rate against the base model;
   writes ``results.json`` and a before/after grid ``before_after.png`` to ``--output``.

The helpers (:func:`fit`, :func:`toy_scores`, :func:`summarize`) are shared with the ablation
``benchmarks/toy_alignment.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lightning_refdpo.data.toy import EVAL_PROMPTS, parse_caption
from lightning_refdpo.evaluation import (
    GenerationConfig,
    evaluation_items,
    generate,
    image_grid,
    load_pipeline,
    score,
)
from lightning_refdpo.metrics import to_pil_images, win_rate
from lightning_refdpo.metrics.toy_reward import ToyReward

BASE_MODEL = "assets/toy/model"
# the sampler of benchmarks/toy/pretrain.py and make_preferences.py
GENERATION = {"num_inference_steps": 25, "guidance_scale": 6.0, "batch_size": 64}


def fit(config: str | Path, overrides: Sequence[str] = ()) -> Any:
    """``lightning-refdpo fit --config CONFIG OVERRIDES...`` in this process; the trained module."""
    from lightning_refdpo.cli import run_cli

    cli = run_cli(["fit", "--config", str(config), *overrides])
    return cli.model.eval()


@torch.no_grad()
def toy_scores(
    pipeline: Any, items: Sequence[tuple[str, int]], config: GenerationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, H, W)`` of the (prompt, seed) items and their ToyReward ``(N,)``."""
    images = generate(pipeline, items, config)
    return images, score({"ToyReward": ToyReward()}, images, [p for p, _ in items])["ToyReward"]


def summarize(scores: torch.Tensor, baseline: torch.Tensor, num_seeds: int) -> dict[str, float]:
    """Means, gain, win rate (ties count half) and the spread of the gain over evaluation seeds.

    ``scores`` and ``baseline`` are paired and prompt-major (``num_seeds`` consecutive items per
    prompt); ``gain_std_over_seeds`` is the standard deviation, over seeds, of the per-seed gain of
    the mean reward over all prompts.
    """
    per_seed_gain = (scores - baseline).view(-1, num_seeds).mean(0)
    return {
        "reward_mean": float(scores.mean()),
        "baseline_reward_mean": float(baseline.mean()),
        "gain": float(scores.mean() - baseline.mean()),
        "gain_std_over_seeds": float(per_seed_gain.std()) if num_seeds > 1 else math.nan,
        "win_rate": win_rate(scores, baseline),
    }


def short_caption(prompt: str) -> str:
    p = parse_caption(prompt)
    return f"{p.colour} {p.shape} {p.position} /{p.background}"


def before_after_grid(
    before: torch.Tensor, after: torch.Tensor, prompts: Sequence[str], columns: int = 8, scale: int = 4
) -> Image.Image:
    """Rows of ``columns`` base images, each followed by the row of the same prompts and seeds
    after alignment; images enlarged ``scale`` times (nearest) so the captions fit."""
    images, captions = [], []
    for start in range(0, len(prompts), columns):
        for label, rows in (("base", before), ("aligned", after)):
            for i in range(start, min(start + columns, len(prompts))):
                image = to_pil_images(rows[i : i + 1])[0]
                images.append(
                    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
                )
                captions.append(f"{label}: {short_caption(prompts[i])}")
    return image_grid(images, captions, columns=columns)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--base-model", default=BASE_MODEL)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--eval-seeds", type=int, default=8, help="images per held-out prompt")
    parser.add_argument("--max-prompts", type=int, default=None, help="first N held-out prompts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args, overrides = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[demo {time.perf_counter() - start:5.0f}s] {message}", flush=True)

    seeds = list(range(args.eval_seeds))
    prompts = list(EVAL_PROMPTS[: args.max_prompts])
    items = evaluation_items(prompts, seeds)
    config = GenerationConfig(**GENERATION)
    progress(f"sampling the base model on {len(prompts)} held-out prompts x {len(seeds)} seeds")
    base_images, base_scores = toy_scores(load_pipeline(args.base_model, "cpu")[0], items, config)
    progress(f"base model: mean ToyReward {base_scores.mean():.4f}")

    progress(f"training: lightning-refdpo fit --config {args.config} {' '.join(overrides)}")
    module = fit(args.config, overrides)
    progress("sampling the aligned model on the same prompts and seeds")
    images, scores = toy_scores(module.build_pipeline(), items, config)
    summary = summarize(scores, base_scores, len(seeds))

    args.output.mkdir(parents=True, exist_ok=True)
    shown = list(range(0, len(items), len(seeds)))[:16]  # first seed of up to 16 prompts
    grid = before_after_grid(base_images[shown], images[shown], [items[i][0] for i in shown])
    grid.save(args.output / "before_after.png")
    results = {
        "config": args.config,
        "overrides": list(overrides),
        "held_out_prompts": len(prompts),
        "seeds": seeds,
        "generation": GENERATION,
        **summary,
        "seconds": time.perf_counter() - start,
    }
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    progress(
        f"held-out ToyReward: base {summary['baseline_reward_mean']:.4f} -> aligned "
        f"{summary['reward_mean']:.4f} (gain {summary['gain']:+.4f}, std of the gain over "
        f"{len(seeds)} seeds {summary['gain_std_over_seeds']:.4f}); win rate vs base "
        f"{100 * summary['win_rate']:.1f}% of {len(items)} images"
    )
    progress(f"wrote {args.output / 'results.json'} and {args.output / 'before_after.png'}")
    return results


if __name__ == "__main__":
    main()
