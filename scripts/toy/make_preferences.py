"""Make the toy preference set of ``assets/toy/data`` from a pool of generators, like Pick-a-Pic.

    python scripts/toy/make_preferences.py --output assets/toy/data \
        --pool assets/toy/model@2=0.3 assets/toy/model@4=0.2 outputs/toy_pretrain/checkpoints/step-600@3=0.2 \
               render=0.1 perturbed=0.2

Pick-a-Pic pairs two images of one prompt from several text-to-image models; this script does the
same with a pool of toy generators, each ``SOURCE[@GUIDANCE]=WEIGHT``:

* a toy pipeline folder sampled with DDIM (``--num-inference-steps``) at classifier-free guidance
  ``GUIDANCE`` (the base model at low guidance, weaker pretraining checkpoints, ...);
* ``render``: a render of the prompt (a random size and offset), through the VAE encoder;
* ``perturbed``: a render of the prompt with one attribute (``--perturb``) changed, through the
  VAE encoder: a fluent image that does not follow the prompt.

Each image of a pair comes from a generator drawn by weight and its own seed. Every image is kept as
its latent (the sampler's final latent, or the VAE posterior mean of a render, both unscaled) and
decoded by the pipelines' shared VAE into the stored PNG, which ToyReward scores: the one with the
higher reward wins (``label_0 = 1.0`` if ``reward_0 - reward_1 > --tie-margin``, ``0.0`` if below
``-tie-margin``, else a tie, ``0.5``). Then a share ``--label-noise`` of the strict pairs has its
label flipped (``flipped = True``), like the disagreement in human preference data.

Written to ``--output``: ``train.parquet`` (training prompts) and ``validation.parquet``
(validation prompts), in the Pick-a-Pic v2 schema (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``)
plus ``latents_0`` / ``latents_1`` (4 x 8 x 8, unscaled; train on them with
``data.latent_columns``), ``reward_0`` / ``reward_1``, ``generator_0`` / ``generator_1`` and
``flipped``; ``stats.json``: per split the mean winner-minus-loser gap of every ToyReward part
(by label, over strict pairs) and how often each generator wins; and ``validation_prompts.txt``, the
validation prompts as a prompt file for ``PreferenceEvaluation`` during training.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from lightning_refdpo.data.preference import decode_image
from lightning_refdpo.evaluation import GenerationConfig, generate, load_pipeline
from lightning_refdpo.metrics import to_float_images, to_pil_images
from lightning_refdpo.testing import encode_image
from lightning_refdpo.toy.reward import ToyReward
from lightning_refdpo.toy.world import (
    TRAIN_PROMPTS,
    VALIDATION_PROMPTS,
    parse_caption,
    perturb,
    render,
    sample_scene,
)

PARTS = ("score", "size", "position", "colour", "shape", "clean", "background", "presence")


@dataclass(frozen=True)
class Generator:
    """One source of the pool: ``source`` is a pipeline folder, ``render`` or ``perturbed``."""

    source: str
    guidance: float | None
    weight: float

    @property
    def name(self) -> str:
        return self.source if self.guidance is None else f"{self.source}@{self.guidance:g}"

    @classmethod
    def parse(cls, spec: str) -> Generator:
        source, _, weight = spec.rpartition("=")
        source, _, guidance = source.partition("@")
        if not source or not weight:
            raise ValueError(f"--pool entry {spec!r} must read SOURCE[@GUIDANCE]=WEIGHT")
        if source not in ("render", "perturbed") and not guidance:
            raise ValueError(f"--pool entry {spec!r}: a model needs a guidance scale, MODEL@GUIDANCE=WEIGHT")
        return cls(source, float(guidance) if guidance else None, float(weight))


@torch.no_grad()
def latents_of(generator: Generator, items: list[tuple[str, int]], vae, args) -> torch.Tensor:
    """Unscaled latents ``(N, 4, 8, 8)`` of ``generator`` for the (prompt, seed) items."""
    if generator.guidance is not None:
        pipeline = load_pipeline(generator.source, "cpu")[0]
        theirs, ours = pipeline.vae.state_dict(), vae.state_dict()
        if pipeline.vae.config.scaling_factor != vae.config.scaling_factor or any(
            not torch.equal(theirs[k], ours[k]) for k in ours
        ):
            raise ValueError(f"{generator.source} has another VAE than the pool's first model")
        config = GenerationConfig(args.num_inference_steps, generator.guidance, batch_size=64)
        return generate(pipeline, items, config, output_type="latent") / vae.config.scaling_factor
    scenes = []
    for prompt, seed in items:
        rng = np.random.default_rng(seed)
        attributes = parse_caption(prompt)
        if generator.source == "perturbed":
            attribute = str(rng.choice(args.perturb))
            attributes = perturb(attributes, rng, {attribute: 1.0})
        scenes.append(render(sample_scene(rng, attributes)))
    return vae.encode(to_float_images(scenes) * 2 - 1).latent_dist.mean


def make_split(
    prompts: list[str], num_pairs: int, first_seed: int, rng: np.random.Generator, vae, args
) -> tuple[datasets.Dataset, dict]:
    """``num_pairs`` pairs over ``prompts`` (cycled in a shuffled order); image ``j`` of pair ``i``
    has seed ``first_seed + 2 i + j`` and a generator drawn from the pool by weight."""
    pool = args.pool
    weights = np.array([g.weight for g in pool]) / sum(g.weight for g in pool)
    order = rng.permutation(len(prompts))
    captions = [prompts[order[i % len(prompts)]] for i in range(num_pairs)]
    chosen = rng.choice(len(pool), size=(num_pairs, 2), p=weights)
    latents = torch.empty(num_pairs, 2, 4, 8, 8)
    for g, generator in enumerate(pool):
        where = [(i, j) for i in range(num_pairs) for j in range(2) if chosen[i, j] == g]
        if where:
            items = [(captions[i], first_seed + 2 * i + j) for i, j in where]
            index = torch.tensor(where)
            latents[index[:, 0], index[:, 1]] = latents_of(generator, items, vae, args)
    with torch.no_grad():
        pixels = torch.cat([vae.decode(chunk).sample for chunk in latents.flatten(0, 1).split(256)])
    pngs = [encode_image(image) for image in to_pil_images((pixels / 2 + 0.5).clamp(0, 1))]
    # scored as stored: the decoded 8-bit PNGs
    stored = to_float_images([decode_image(png) for png in pngs])
    parts = ToyReward().parts(stored, [c for c in captions for _ in range(2)])
    parts = {k: v.view(num_pairs, 2) for k, v in parts.items()}
    rewards = parts["score"]

    gap = rewards[:, 0] - rewards[:, 1]
    labels = torch.where(gap > args.tie_margin, 1.0, torch.where(gap < -args.tie_margin, 0.0, 0.5))
    strict = labels != 0.5
    flipped = strict & torch.from_numpy(rng.random(num_pairs) < args.label_noise)
    labels = torch.where(flipped, 1.0 - labels, labels)
    dataset = datasets.Dataset.from_dict(
        {
            "caption": captions,
            "jpg_0": pngs[0::2],
            "jpg_1": pngs[1::2],
            "label_0": labels.tolist(),
            "latents_0": latents[:, 0].numpy(),
            "latents_1": latents[:, 1].numpy(),
            "reward_0": rewards[:, 0].tolist(),
            "reward_1": rewards[:, 1].tolist(),
            "generator_0": [pool[g].name for g in chosen[:, 0]],
            "generator_1": [pool[g].name for g in chosen[:, 1]],
            "flipped": flipped.tolist(),
        },
        features=datasets.Features(
            {
                "caption": datasets.Value("string"),
                "jpg_0": datasets.Value("binary"),
                "jpg_1": datasets.Value("binary"),
                "label_0": datasets.Value("float32"),
                "latents_0": datasets.Array3D((4, 8, 8), "float32"),
                "latents_1": datasets.Array3D((4, 8, 8), "float32"),
                "reward_0": datasets.Value("float32"),
                "reward_1": datasets.Value("float32"),
                "generator_0": datasets.Value("string"),
                "generator_1": datasets.Value("string"),
                "flipped": datasets.Value("bool"),
            }
        ),
    )
    return dataset, split_stats(parts, labels, chosen, pool)


def split_stats(parts: dict, labels: torch.Tensor, chosen: np.ndarray, pool: list[Generator]) -> dict:
    """Winner-minus-loser gap of every part by label (strict pairs), and per generator its mean
    reward and how often it wins the strict pairs it is in."""
    strict = labels != 0.5
    sign = (2 * labels - 1)[strict]
    generators = {}
    for g, generator in enumerate(pool):
        mask = torch.from_numpy(chosen == g)
        won = (mask[strict] & (torch.stack([sign > 0, sign < 0], dim=1))).sum()
        generators[generator.name] = {
            "images": int(mask.sum()),
            "mean_reward": float(parts["score"][mask].mean()) if mask.any() else None,
            "win_share": float(won / mask[strict].sum()) if mask[strict].any() else None,
        }
    return {
        "pairs": len(labels),
        "ties": int((~strict).sum()),
        "winner_minus_loser": {
            k: float(((parts[k][strict, 0] - parts[k][strict, 1]) * sign).mean()) for k in PARTS
        },
        "generators": generators,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", nargs="+", type=Generator.parse, required=True, metavar="SOURCE[@G]=W")
    parser.add_argument("--output", type=Path, default=Path("assets/toy/data"))
    parser.add_argument("--train-pairs", type=int, default=1000)
    parser.add_argument("--validation-pairs", type=int, default=180)
    parser.add_argument("--label-noise", type=float, default=0.1)
    parser.add_argument(
        "--tie-margin", type=float, default=0.005, help="|reward_0 - reward_1| <= this is a tie"
    )
    parser.add_argument(
        "--perturb", nargs="+", default=["shape", "colour", "position"], help="attributes `perturbed` changes"
    )
    parser.add_argument("--num-inference-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    first_model = next(g.source for g in args.pool if g.guidance is not None)
    vae = load_pipeline(first_model, "cpu")[0].vae
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # seeds of the two splits never overlap: validation starts after the last training seed
    splits = {
        "train": (TRAIN_PROMPTS, args.train_pairs, 0),
        "validation": (VALIDATION_PROMPTS, args.validation_pairs, 2 * args.train_pairs),
    }
    stats = {"pool": [g.__dict__ for g in args.pool], "label_noise": args.label_noise, "splits": {}}
    for name, (prompts, num_pairs, first_seed) in splits.items():
        dataset, stats["splits"][name] = make_split(list(prompts), num_pairs, first_seed, rng, vae, args)
        dataset.to_parquet(str(args.output / f"{name}.parquet"))
        gaps = "  ".join(f"{k} {v:+.3f}" for k, v in stats["splits"][name]["winner_minus_loser"].items())
        print(f"{name}: {num_pairs} pairs, {stats['splits'][name]['ties']} ties; winner - loser: {gaps}")
        for generator, g in stats["splits"][name]["generators"].items():
            print(f"  {generator}: {g}", flush=True)
    (args.output / "stats.json").write_text(json.dumps(stats, indent=2))
    (args.output / "validation_prompts.txt").write_text("\n".join(VALIDATION_PROMPTS) + "\n")
    print(f"wrote {args.output} in {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
