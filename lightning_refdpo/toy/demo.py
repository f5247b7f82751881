"""The toy-world demo (``make demo``): align the shipped toy model with the paper's method, measure it.

    python -m lightning_refdpo.toy.demo [--config configs/demo.yaml] [--output outputs/demo]
                                        [--overrides '[--trainer.max_steps=50]'] [--help]

1. samples the shipped base model (``assets/toy/model``) on the test prompts
   (:data:`~lightning_refdpo.toy.world.TEST_PROMPTS`, 45 prompts, ``--eval_seeds`` seeds each, DDIM
   at the guidance chosen on the validation prompts) and scores it with
   :class:`~lightning_refdpo.toy.reward.ToyReward`;
2. trains it on the shipped preference set (``assets/toy/data``) through the normal CLI:
   ``lightning-refdpo fit --config configs/demo.yaml [overrides]`` (run in this process);
3. samples the aligned policy on the same (prompt, seed) items and prints a verdict: the win rate
   against the base model with its 95 % bootstrap interval over prompts, the gain in standard
   deviations of the per-seed gain, and pass or fail against the target (win rate >= 65 % with the
   interval's lower bound above 50 %); writes ``results.json`` (also every attribute before and
   after) and a before/after grid ``before_after.png`` with each image's reward.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import auto_cli
from PIL import Image

from lightning_refdpo.evaluation import GenerationConfig, evaluation_items, image_grid, load_pipeline
from lightning_refdpo.metrics import to_pil_images, win_outcomes, win_rate
from lightning_refdpo.toy.evaluate import (
    GENERATION,
    attribute_summary,
    bootstrap_ci,
    gain_in_std,
    toy_scores,
)
from lightning_refdpo.toy.world import TEST_PROMPTS, parse_caption

BASE_MODEL = "assets/toy/model"
TARGET_WIN_RATE = 0.65


def fit(config: str | Path, overrides: Sequence[str] = ()) -> Any:
    """``lightning-refdpo fit --config CONFIG OVERRIDES...`` in this process; the trained module."""
    from lightning_refdpo.cli import run_cli

    cli = run_cli(["fit", "--config", str(config), *overrides])
    return cli.model.eval()


def verdict(scores: torch.Tensor, baseline: torch.Tensor, num_seeds: int) -> dict[str, Any]:
    """Win rate with its 95 % bootstrap interval over prompts, gain and gain in standard deviations
    (``scores`` and ``baseline`` prompt-major, ``num_seeds`` items per prompt), and ``passed``."""
    outcomes = win_outcomes(scores, baseline).view(1, -1, num_seeds)
    low, high = bootstrap_ci(outcomes)
    rate = win_rate(scores, baseline)
    return {
        "win_rate": rate,
        "win_rate_ci": [low, high],
        "reward_mean": float(scores.mean()),
        "baseline_reward_mean": float(baseline.mean()),
        "gain": float(scores.mean() - baseline.mean()),
        "gain_in_std": gain_in_std(scores.view(-1, num_seeds), baseline.view(-1, num_seeds)),
        "target": {"win_rate": TARGET_WIN_RATE, "ci_low_above": 0.5},
        "passed": rate >= TARGET_WIN_RATE and low > 0.5,
    }


def short_caption(prompt: str) -> str:
    p = parse_caption(prompt)
    return f"{p.colour} {p.shape} {p.position}, {p.background}"


def before_after_grid(
    before: torch.Tensor,
    after: torch.Tensor,
    before_scores: torch.Tensor,
    after_scores: torch.Tensor,
    prompts: Sequence[str],
    columns: int = 8,
    scale: int = 4,
) -> Image.Image:
    """Rows of ``columns`` base images, each followed by the row of the same prompts and seeds
    after alignment, captioned with the prompt and the image's reward; images enlarged ``scale``
    times (nearest) so the captions fit."""
    images, captions = [], []
    for start in range(0, len(prompts), columns):
        for label, rows, scores in (("base", before, before_scores), ("aligned", after, after_scores)):
            for i in range(start, min(start + columns, len(prompts))):
                image = to_pil_images(rows[i : i + 1])[0]
                images.append(
                    image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
                )
                captions.append(f"{label} {scores[i]:.2f}: {short_caption(prompts[i])}")
    return image_grid(images, captions, columns=columns)


def run_demo(
    config: str = "configs/demo.yaml",
    output: str = "outputs/demo",
    base_model: str = BASE_MODEL,
    eval_seeds: int = 8,
    max_prompts: int | None = None,
    threads: int | None = None,
    overrides: list[str] = [],  # noqa: B006 - jsonargparse reads the default
) -> dict:
    """Align the toy base model with the paper's method and measure it against the base model.

    Args:
        config: the ``lightning-refdpo fit`` config of the training.
        output: folder for ``results.json`` and ``before_after.png``.
        base_model: the toy base model (a diffusers pipeline folder) sampled before training.
        eval_seeds: images per test prompt.
        max_prompts: keep the first N test prompts.
        threads: torch threads (default: all).
        overrides: ``lightning-refdpo fit`` options applied after the config, e.g.
            ``[--trainer.max_steps=50]``.
    """
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[demo {time.perf_counter() - start:5.0f}s] {message}", flush=True)

    seeds = list(range(eval_seeds))
    prompts = list(TEST_PROMPTS[:max_prompts])
    items = evaluation_items(prompts, seeds)
    generation = GenerationConfig(**GENERATION)
    progress(
        f"sampling the base model on {len(prompts)} test prompts x {len(seeds)} seeds "
        f"(DDIM {generation.num_inference_steps} steps, guidance {generation.guidance_scale})"
    )
    base_images, base_parts = toy_scores(load_pipeline(base_model, "cpu")[0], items, generation)
    progress(f"base model: mean ToyReward {base_parts['score'].mean():.4f}")

    progress(f"training: lightning-refdpo fit --config {config} {' '.join(overrides)}")
    module = fit(config, overrides)
    progress("sampling the aligned model on the same prompts and seeds")
    images, parts = toy_scores(module.build_pipeline(), items, generation)
    summary = verdict(parts["score"], base_parts["score"], len(seeds))

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    shown = list(range(0, len(items), len(seeds)))[:16]  # first seed of up to 16 prompts
    grid = before_after_grid(
        base_images[shown],
        images[shown],
        base_parts["score"][shown],
        parts["score"][shown],
        [items[i][0] for i in shown],
    )
    grid.save(folder / "before_after.png")
    low, high = summary["win_rate_ci"]
    line = (
        f"verdict: {'PASS' if summary['passed'] else 'FAIL'}: win rate vs base {100 * summary['win_rate']:.1f}% "
        f"(95% CI {100 * low:.1f}-{100 * high:.1f}%), gain {summary['gain']:+.4f} = "
        f"{summary['gain_in_std']:.1f} std over seeds; target: win rate >= {100 * TARGET_WIN_RATE:.0f}% "
        "with the CI above 50%"
    )
    results = {
        "config": config,
        "overrides": list(overrides),
        "test_prompts": len(prompts),
        "seeds": seeds,
        "generation": GENERATION,
        **summary,
        "attributes": attribute_summary(parts),
        "baseline_attributes": attribute_summary(base_parts),
        "verdict": line,
        "seconds": time.perf_counter() - start,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    progress(
        f"test ToyReward: base {summary['baseline_reward_mean']:.4f} -> aligned {summary['reward_mean']:.4f}; "
        f"wrote {folder / 'results.json'} and {folder / 'before_after.png'}"
    )
    print(line, flush=True)
    return results


def main(args: Sequence[str] | None = None) -> dict:
    """``python -m lightning_refdpo.toy.demo``: :func:`run_demo` with the options of ``args``
    (default: ``sys.argv[1:]``)."""
    return auto_cli(run_demo, args=args, prog="python -m lightning_refdpo.toy.demo")


if __name__ == "__main__":
    main()
