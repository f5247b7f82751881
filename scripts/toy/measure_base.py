"""Measure toy models attribute by attribute, to choose the base model and its guidance scale.

    python scripts/toy/measure_base.py outputs/toy_pretrain outputs/toy_pretrain/checkpoints/step-* \
        --guidance 1 2 3 4.5 6 --output outputs/toy_pretrain/measurements.json

For every model and guidance scale: DDIM samples of the validation prompts
(``lightning_refdpo.toy.world.VALIDATION_PROMPTS``, never the test prompts) x ``--seeds`` seeds,
scored with ToyReward; printed and written as JSON: the mean reward, per attribute the mean of its
part and the share of images that follow it (part >= 0.5), and ``pairs_one_right``, the share of
two samples of one prompt (seeds 2k and 2k+1) where exactly one follows the attribute: how often a
preference pair between two samples of this model carries that attribute's signal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_refdpo.evaluation import GenerationConfig, evaluation_items, load_pipeline
from lightning_refdpo.toy.evaluate import ATTRIBUTES, CORRECT, attribute_summary, toy_scores
from lightning_refdpo.toy.world import TEST_PROMPTS, TRAIN_PROMPTS, VALIDATION_PROMPTS

SPLITS = {"train": TRAIN_PROMPTS, "validation": VALIDATION_PROMPTS, "test": TEST_PROMPTS}


def measure(pipeline, items, guidance: float, steps: int, num_seeds: int) -> dict:
    config = GenerationConfig(steps, guidance, batch_size=64)
    _, parts = toy_scores(pipeline, items, config)
    summary = {"reward": float(parts["score"].mean()), "attributes": attribute_summary(parts)}
    for name in ATTRIBUTES:
        right = (parts[name] >= CORRECT).view(-1, num_seeds)[:, : num_seeds // 2 * 2].reshape(-1, 2)
        summary["attributes"][name]["pairs_one_right"] = float((right[:, 0] != right[:, 1]).float().mean())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="toy pipeline folders")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 3.0, 4.5, 6.0])
    parser.add_argument("--split", choices=tuple(SPLITS), default="validation")
    parser.add_argument("--seeds", type=int, default=4, help="samples per prompt")
    parser.add_argument("--num-inference-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    items = evaluation_items(list(SPLITS[args.split]), list(range(args.seeds)))
    results = {"split": args.split, "seeds": args.seeds, "models": {}}
    for model in args.models:
        pipeline = load_pipeline(model, "cpu")[0]
        results["models"][model] = {}
        for guidance in args.guidance:
            summary = measure(pipeline, items, guidance, args.num_inference_steps, args.seeds)
            results["models"][model][str(guidance)] = summary
            parts = "  ".join(
                f"{name} {a['mean']:.2f}/{100 * a['correct']:.0f}%/{100 * a['pairs_one_right']:.0f}%"
                for name, a in summary["attributes"].items()
            )
            print(f"{model} g={guidance}: reward {summary['reward']:.4f}  {parts}", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
