"""Pretrain the toy text-to-image model of ``assets/toy/model`` on renders of the training prompts.

    python scripts/toy/pretrain.py --output outputs/toy_pretrain \
        --vae-from assets/toy/model --caption-noise position=0.5 colour=0.3

The pipeline is built by :func:`lightning_refdpo.testing.save_tiny_stable_diffusion` (SD1.5 layout:
byte-level CLIP tokenizer, CLIP text encoder, UNet, a VAE with 32 px images -> 4 x 8 x 8 latents,
the SD1.5 noise schedule), then trained in two stages on 32 px renders of
``lightning_refdpo.toy.world.TRAIN_PROMPTS`` (validation and test prompts are never seen):

1. the VAE as an autoencoder: ``||D(z) - x||^2 + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)``
   with ``z ~ q(z|x)``; then ``scaling_factor = 1 / std(z)`` so that the scaled latents have unit
   variance, as in Stable Diffusion. ``--vae-from MODEL`` takes the VAE of an existing toy pipeline
   instead and skips this stage;
2. the UNet and the text encoder together, VAE frozen, on the objective of the diffusers
   text-to-image script ``||y - f_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c)||^2`` with
   ``t ~ U{0..999}``, the target ``y = eps`` (``--prediction-type epsilon``) or the velocity
   ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) z`` (``v_prediction``, the default: at 8 x 8 latents
   epsilon-prediction barely learns layout, see ``benchmarks/README.md``), the caption replaced by
   ``""`` with probability ``caption_dropout`` (what classifier-free guidance needs) and, with
   ``--caption-noise ATTRIBUTE=P``, attribute ``ATTRIBUTE`` of the caption replaced by another value
   with probability ``P`` (the image keeps its own): the model then follows that attribute only
   partly, like a real base model follows prompts imperfectly. ``--size-range LOW HIGH`` draws the
   objects of the denoiser's renders from a narrower range (larger objects: curated data, like the
   aesthetic filtering of a stronger real model's data).

Both stages use AdamW with linear warm-up then cosine decay, gradients clipped to norm 1. The
script is seeded and runs on ``--threads`` CPU threads. ``--save-every N`` also saves the pipeline
every N denoiser steps to ``OUTPUT/checkpoints/step-N`` (the weaker generators of the preference
set). ``scripts/toy/measure_base.py`` then measures every checkpoint attribute by attribute.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline

from lightning_refdpo.metrics.base import to_float_images
from lightning_refdpo.testing import save_tiny_stable_diffusion
from lightning_refdpo.toy.world import (
    SIZE_RANGE,
    TRAIN_PROMPTS,
    caption,
    parse_caption,
    perturb,
    render,
    sample_scene,
)

ARCHITECTURE = {
    "block_out_channels": (32, 64),
    "cross_attention_dim": 64,
    "text_intermediate_size": 128,
    "text_layers": 2,
    "model_max_length": 48,  # the longest toy caption is 44 byte tokens with BOS and EOS
    "vae_block_out_channels": (8, 16, 32),
}


def renders(
    rng: np.random.Generator, batch_size: int, size_range: tuple[float, float] = SIZE_RANGE
) -> tuple[list[str], torch.Tensor]:
    """Captions and renders in ``[-1, 1]`` of random scenes of the training prompts."""
    captions = [TRAIN_PROMPTS[i] for i in rng.integers(len(TRAIN_PROMPTS), size=batch_size)]
    images = [render(sample_scene(rng, parse_caption(c), size_range)) for c in captions]
    return captions, to_float_images(images) * 2 - 1


def schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )


def fit(
    parameters: list[torch.nn.Parameter],
    losses: Iterator[torch.Tensor],
    steps: int,
    lr: float,
    name: str,
    on_step: Callable[[int], None] = lambda step: None,
) -> None:
    """Minimise ``steps`` losses from ``losses`` with AdamW, printing progress every 10%;
    ``on_step(n)`` runs after optimizer step ``n`` (1-based)."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    scheduler = schedule(optimizer, steps, warmup=max(1, steps // 20))
    start, running = time.perf_counter(), []
    for step in range(steps):
        loss = next(losses)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        on_step(step + 1)
        running.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            print(
                f"{name} step {step + 1}/{steps}  loss {np.mean(running):.4f}  "
                f"{time.perf_counter() - start:.0f}s",
                flush=True,
            )
            running = []


def vae_losses(vae, rng: np.random.Generator, batch_size: int, kl_weight: float) -> Iterator[torch.Tensor]:
    while True:
        _, pixels = renders(rng, batch_size)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / pixels[0].numel()
        yield F.mse_loss(reconstruction, pixels) + kl_weight * kl


@torch.no_grad()
def encode_pool(
    vae, rng: np.random.Generator, size: int, size_range: tuple[float, float], batch_size: int = 256
) -> dict:
    """Captions and posterior means and standard deviations of ``size`` fresh renders."""
    pool = {"caption": [], "mean": [], "std": []}
    for _ in range(math.ceil(size / batch_size)):
        captions, pixels = renders(rng, batch_size, size_range)
        posterior = vae.encode(pixels).latent_dist
        pool["caption"] += captions
        pool["mean"].append(posterior.mean)
        pool["std"].append(posterior.std)
    return {"caption": pool["caption"], "mean": torch.cat(pool["mean"]), "std": torch.cat(pool["std"])}


def denoiser_losses(
    pipeline,
    pool: dict,
    rng: np.random.Generator,
    batch_size: int,
    caption_dropout: float,
    caption_noise: dict[str, float],
) -> Iterator[torch.Tensor]:
    scheduler, scaling = pipeline.scheduler, pipeline.vae.config.scaling_factor
    while True:
        index = torch.from_numpy(rng.integers(len(pool["caption"]), size=batch_size))
        latents = (pool["mean"][index] + pool["std"][index] * torch.randn_like(pool["std"][index])) * scaling
        captions = [
            ""
            if rng.random() < caption_dropout
            else caption(perturb(parse_caption(pool["caption"][i]), rng, caption_noise))
            for i in index.tolist()
        ]
        ids = pipeline.tokenizer(
            captions,
            padding="max_length",
            max_length=pipeline.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = pipeline.unet(noisy, timesteps, pipeline.text_encoder(ids)[0]).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        yield F.mse_loss(prediction, target)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("assets/toy/model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=3e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--pool-size", type=int, default=16384)
    parser.add_argument("--unet-steps", type=int, default=1800)
    parser.add_argument("--unet-batch-size", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument(
        "--caption-noise",
        nargs="*",
        default=[],
        metavar="ATTRIBUTE=P",
        help="replace ATTRIBUTE (shape, colour, position, background) in a caption with probability P",
    )
    parser.add_argument(
        "--size-range",
        nargs=2,
        type=float,
        default=SIZE_RANGE,
        metavar=("LOW", "HIGH"),
        help="object sizes (px) of the denoiser's training renders: a narrower, larger range is curated "
        "data, which makes a generator that is better on the global quality",
    )
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="v_prediction")
    parser.add_argument("--vae-from", type=Path, default=None, help="take the VAE of this toy pipeline")
    parser.add_argument("--save-every", type=int, default=0, help="save the pipeline every N denoiser steps")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    caption_noise = {k: float(v) for k, v in (item.split("=", 1) for item in args.caption_noise)}
    save_tiny_stable_diffusion(
        args.output, seed=args.seed, prediction_type=args.prediction_type, **ARCHITECTURE
    )
    pipeline = StableDiffusionPipeline.from_pretrained(args.output, local_files_only=True)
    unet, text_encoder = pipeline.unet, pipeline.text_encoder

    if args.vae_from is None:
        vae = pipeline.vae.train()
        fit(
            list(vae.parameters()),
            vae_losses(vae, rng, args.vae_batch_size, args.kl_weight),
            args.vae_steps,
            args.vae_lr,
            "vae",
        )
    else:
        pipeline.register_modules(
            vae=AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", local_files_only=True)
        )
    vae = pipeline.vae.eval().requires_grad_(False)
    pool = encode_pool(vae, rng, args.pool_size, tuple(args.size_range))
    if args.vae_from is None:
        vae.register_to_config(scaling_factor=1.0 / pool["mean"].std().item())
    print(f"vae scaling_factor {vae.config.scaling_factor:.4f}, latent pool of {args.pool_size}", flush=True)

    def save(step: int) -> None:
        if args.save_every and step % args.save_every == 0 and step < args.unet_steps:
            pipeline.save_pretrained(args.output / "checkpoints" / f"step-{step}")

    unet.train()
    text_encoder.train()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    losses = denoiser_losses(pipeline, pool, rng, args.unet_batch_size, args.caption_dropout, caption_noise)
    fit(parameters, losses, args.unet_steps, args.unet_lr, "unet", on_step=save)
    unet.eval()
    text_encoder.eval()
    pipeline.save_pretrained(args.output)
    print(f"saved to {args.output} after {time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
