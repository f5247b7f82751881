"""Pretrain the toy text-to-image model of ``assets/toy/model`` on renders of the training prompts.

    python benchmarks/toy/pretrain.py --output assets/toy/model

The pipeline is built by :func:`lightning_refdpo.tiny.save_tiny_stable_diffusion` (SD1.5 layout:
byte-level CLIP tokenizer, CLIP text encoder, UNet, a VAE with 32 px images -> 4 x 8 x 8 latents,
the SD1.5 DDPM noise schedule), then trained in two stages on 32 px renders of
``lightning_refdpo.data.toy.TRAIN_PROMPTS`` (the held-out ``EVAL_PROMPTS`` are never seen):

1. the VAE as an autoencoder: ``||D(z) - x||^2 + kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)``
   with ``z ~ q(z|x)``; then ``scaling_factor = 1 / std(z)`` so that the scaled latents have unit
   variance, as in Stable Diffusion;
2. the UNet and the text encoder together, VAE frozen, on the epsilon-prediction objective of the
   diffusers text-to-image script ``||eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, c)||^2``
   with ``t ~ U{0..999}`` and the caption replaced by ``""`` with probability ``caption_dropout``
   (what classifier-free guidance needs).

Both stages use AdamW with linear warm-up then cosine decay, gradients clipped to norm 1. The
script is seeded and runs on one CPU thread (about 20 minutes); at the end it prints the mean
ToyReward of DDIM samples on the held-out prompts next to those of renders and of noise.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from lightning_refdpo.data.toy import EVAL_PROMPTS, TRAIN_PROMPTS, parse_caption, render, sample_scene
from lightning_refdpo.evaluation import GenerationConfig, generate, load_pipeline
from lightning_refdpo.metrics.base import to_float_images
from lightning_refdpo.metrics.toy_reward import ToyReward
from lightning_refdpo.tiny import save_tiny_stable_diffusion

ARCHITECTURE = {
    "block_out_channels": (32, 64),
    "cross_attention_dim": 64,
    "text_intermediate_size": 128,
    "text_layers": 2,
    "model_max_length": 48,  # the longest toy caption is 44 byte tokens with BOS and EOS
    "vae_block_out_channels": (8, 16, 32),
}


def renders(rng: np.random.Generator, batch_size: int) -> tuple[list[str], torch.Tensor]:
    """Captions and renders in ``[-1, 1]`` of random scenes of the training prompts."""
    captions = [TRAIN_PROMPTS[i] for i in rng.integers(len(TRAIN_PROMPTS), size=batch_size)]
    images = [render(sample_scene(rng, parse_caption(c))) for c in captions]
    return captions, to_float_images(images) * 2 - 1


def schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )


def fit(
    parameters: list[torch.nn.Parameter], losses: Iterator[torch.Tensor], steps: int, lr: float, name: str
) -> None:
    """Minimise ``steps`` losses from ``losses`` with AdamW, printing progress every 10%."""
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
def encode_pool(vae, rng: np.random.Generator, size: int, batch_size: int = 256) -> dict:
    """Captions and posterior means and standard deviations of ``size`` fresh renders."""
    pool = {"caption": [], "mean": [], "std": []}
    for _ in range(math.ceil(size / batch_size)):
        captions, pixels = renders(rng, batch_size)
        posterior = vae.encode(pixels).latent_dist
        pool["caption"] += captions
        pool["mean"].append(posterior.mean)
        pool["std"].append(posterior.std)
    return {"caption": pool["caption"], "mean": torch.cat(pool["mean"]), "std": torch.cat(pool["std"])}


def denoiser_losses(
    pipeline, pool: dict, rng: np.random.Generator, batch_size: int, caption_dropout: float
) -> Iterator[torch.Tensor]:
    scheduler, scaling = pipeline.scheduler, pipeline.vae.config.scaling_factor
    while True:
        index = torch.from_numpy(rng.integers(len(pool["caption"]), size=batch_size))
        latents = (pool["mean"][index] + pool["std"][index] * torch.randn_like(pool["std"][index])) * scaling
        captions = ["" if rng.random() < caption_dropout else pool["caption"][i] for i in index.tolist()]
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
        yield F.mse_loss(prediction, noise)


def mean_reward(images, prompts: list[str]) -> float:
    reward = ToyReward()
    reward.update(images, prompts)
    return reward.compute().item()


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
    parser.add_argument("--eval-seeds", type=int, default=4, help="samples per held-out prompt")
    parser.add_argument("--num-inference-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=6.0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    save_tiny_stable_diffusion(args.output, seed=args.seed, **ARCHITECTURE)
    pipeline = StableDiffusionPipeline.from_pretrained(args.output, local_files_only=True)
    vae, unet, text_encoder = pipeline.vae, pipeline.unet, pipeline.text_encoder

    vae.train()
    fit(
        list(vae.parameters()),
        vae_losses(vae, rng, args.vae_batch_size, args.kl_weight),
        args.vae_steps,
        args.vae_lr,
        "vae",
    )
    vae.eval().requires_grad_(False)
    pool = encode_pool(vae, rng, args.pool_size)
    vae.register_to_config(scaling_factor=1.0 / pool["mean"].std().item())
    print(f"vae scaling_factor {vae.config.scaling_factor:.4f}, latent pool of {args.pool_size}", flush=True)

    unet.train()
    text_encoder.train()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    losses = denoiser_losses(pipeline, pool, rng, args.unet_batch_size, args.caption_dropout)
    fit(parameters, losses, args.unet_steps, args.unet_lr, "unet")
    unet.eval()
    text_encoder.eval()
    pipeline.save_pretrained(args.output)
    print(f"saved to {args.output} after {time.perf_counter() - start:.0f}s", flush=True)

    prompts = [p for p in EVAL_PROMPTS for _ in range(args.eval_seeds)]
    seeds = list(range(len(prompts)))
    config = GenerationConfig(args.num_inference_steps, args.guidance_scale, batch_size=64)
    samples = generate(
        load_pipeline(str(args.output), "cpu")[0], list(zip(prompts, seeds, strict=True)), config
    )
    truth = [
        render(sample_scene(np.random.default_rng(s), parse_caption(p)))
        for p, s in zip(prompts, seeds, strict=True)
    ]
    noise = torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    print(
        f"mean ToyReward on {len(prompts)} held-out prompt/seed pairs: samples {mean_reward(samples, prompts):.3f} "
        f"(DDIM {args.num_inference_steps} steps, guidance {args.guidance_scale}), "
        f"renders {mean_reward(truth, prompts):.3f}, noise {mean_reward(noise, prompts):.3f}; "
        f"total {time.perf_counter() - start:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
