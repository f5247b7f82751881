"""Make the toy preference set of ``assets/toy/data`` from the pretrained toy model's own samples.

    python benchmarks/toy/make_preferences.py --model assets/toy/model --output assets/toy/data

Each pair is two DDIM samples of one prompt from different seeds; the one with the higher
ToyReward wins (``label_0 = 1.0`` if ``reward_0 > reward_1``, ``0.0`` if lower, ``0.5`` if within
``--tie-margin``). Then a share ``--label-noise`` of the strict pairs, drawn at random, has its label
flipped (``flipped = True``), like the disagreement in human preference data; ``--drop-ties`` leaves
ties out. ``train.parquet`` uses the training prompts (each about equally often), and
``validation.parquet`` the held-out ``EVAL_PROMPTS``. Columns: the Pick-a-Pic v2 schema
(``caption``, ``jpg_0``, ``jpg_1`` as PNG bytes, ``label_0``) plus ``reward_0``, ``reward_1`` and
``flipped``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets
import numpy as np
import torch

from lightning_refdpo.data.toy import EVAL_PROMPTS, TRAIN_PROMPTS
from lightning_refdpo.evaluation import GenerationConfig, generate, load_pipeline
from lightning_refdpo.metrics import to_pil_images
from lightning_refdpo.metrics.toy_reward import ToyReward
from lightning_refdpo.tiny import encode_image


def make_split(
    pipeline,
    prompts: list[str],
    num_pairs: int,
    first_seed: int,
    rng: np.random.Generator,
    args: argparse.Namespace,
) -> datasets.Dataset:
    """``num_pairs`` pairs over ``prompts`` (cycled in a shuffled order); image ``j`` of pair ``i``
    is sampled with seed ``first_seed + 2 i + j``."""
    order = rng.permutation(len(prompts))
    captions = [prompts[order[i % len(prompts)]] for i in range(num_pairs)]
    seeds = [first_seed + 2 * i + j for i in range(num_pairs) for j in range(2)]
    pair_captions = [c for c in captions for _ in range(2)]
    config = GenerationConfig(args.num_inference_steps, args.guidance_scale, batch_size=64)
    # scored as stored: 8-bit images, so that the reward columns match the decoded PNGs exactly
    images = to_pil_images(generate(pipeline, list(zip(pair_captions, seeds, strict=True)), config))
    reward = ToyReward()
    reward.update(images, pair_captions)
    rewards = reward.scores().view(num_pairs, 2)

    gap = rewards[:, 0] - rewards[:, 1]
    labels = torch.where(gap > args.tie_margin, 1.0, torch.where(gap < -args.tie_margin, 0.0, 0.5))
    strict = labels != 0.5
    flipped = strict & torch.from_numpy(rng.random(num_pairs) < args.label_noise)
    labels = torch.where(flipped, 1.0 - labels, labels)
    keep = ~(labels == 0.5) if args.drop_ties else torch.ones(num_pairs, dtype=torch.bool)

    print(
        f"  {int(keep.sum())} pairs ({int((labels[keep] == 0.5).sum())} ties, {int(flipped[keep].sum())} flipped): "
        f"mean reward {rewards[keep].mean():.3f}, winner - loser {gap[keep & strict].abs().mean():.3f} "
        f"by reward, {(gap * (2 * labels - 1))[keep & strict].mean():.3f} by label",
        flush=True,
    )
    rows = [i for i in range(num_pairs) if keep[i]]
    return datasets.Dataset.from_dict(
        {
            "caption": [captions[i] for i in rows],
            "jpg_0": [encode_image(images[2 * i]) for i in rows],
            "jpg_1": [encode_image(images[2 * i + 1]) for i in rows],
            "label_0": [float(labels[i]) for i in rows],
            "reward_0": [float(rewards[i, 0]) for i in rows],
            "reward_1": [float(rewards[i, 1]) for i in rows],
            "flipped": [bool(flipped[i]) for i in rows],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("assets/toy/model"))
    parser.add_argument("--output", type=Path, default=Path("assets/toy/data"))
    parser.add_argument("--train-pairs", type=int, default=1000)
    parser.add_argument("--validation-pairs", type=int, default=180)
    parser.add_argument("--label-noise", type=float, default=0.1)
    parser.add_argument(
        "--tie-margin", type=float, default=0.0, help="|reward_0 - reward_1| <= this is a tie"
    )
    parser.add_argument("--drop-ties", action="store_true")
    parser.add_argument("--num-inference-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    pipeline = load_pipeline(str(args.model), "cpu")[0]
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # seeds of the two splits never overlap: validation starts after the last training seed
    splits = {
        "train": (TRAIN_PROMPTS, args.train_pairs, 0),
        "validation": (EVAL_PROMPTS, args.validation_pairs, 2 * args.train_pairs),
    }
    for name, (prompts, num_pairs, first_seed) in splits.items():
        print(f"{name}: sampling {2 * num_pairs} images", flush=True)
        dataset = make_split(pipeline, list(prompts), num_pairs, first_seed, rng, args)
        dataset.to_parquet(str(args.output / f"{name}.parquet"))
    print(f"wrote {args.output} in {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
