"""What a Diffusion-DPO training step costs, against the work it cannot avoid.

    python benchmarks/step_cost.py                   # ~4.5 min on 2 CPU cores; writes benchmarks/results/step_cost.json
    python benchmarks/step_cost.py --preset tiny --output /tmp/step_cost.json   # seconds (the suite's smoke test)
    python benchmarks/step_cost.py --device cuda --preset sd15-size --output step_cost_gpu.json   # on a GPU

On a small SD-shaped model (``--preset sd-small``: a 37 M-parameter UNet on 32 x 32 latents, a
VAE with the SD 8x downsampling at 256 px, a CLIP text encoder of width 256 and 77 tokens), all
in full fine-tuning and fp32, with the same preference pairs, it times one step of:

(a) ``bare``: a plain PyTorch loop doing only the unavoidable work: latents ``mean + std * eps``
    from in-memory cached posteriors, one policy forward and backward over winners and losers,
    one no-grad reference forward over the same inputs, the loss, AdamW;
(b) ``module``: :class:`DiffusionDPOModule` through the Lightning Trainer, data from the latent
    cache (``lightning-refdpo cache``) through :class:`PreferenceDataModule`;
(c) ``module_uncached``: the same module and Trainer, images decoded, VAE- and text-encoded at
    every step;
(d) ``public_style``: a loop in the style of the public Diffusion-DPO training scripts: the same
    pixel data loader, VAE and text encoding every step, a separate reference UNet, and separate
    forwards for winners and losers.

A step's time is the wall time between the ends of two consecutive steps, so data loading,
logging and the optimizer are counted; the first step of every run is a warm-up and not counted.
The four are run in turn, ``--rounds`` times, so that a slow spell of a shared machine falls on
all of them; the figures are medians over every counted step.

Reference-update events (``ReferenceModelUpdate``, full fine-tuning, ``divergence_samples`` = 4
winners of a training batch): the time of one event, 3 events of each kind timed in every round
after its steps (so a slow spell falls on steps and events alike), the median, and that time
amortized over ``tau`` = 32 steps as a share of the module's step (b):

- ``hard_copy_accepted`` / ``hard_copy_refused``: ``alpha = 1``, the candidate measured on the
  policy (two no-grad forwards of the winners: the candidate's and the initial model's) and, when
  accepted, the policy copied into the reference;
- ``cpu_copy_accepted``: the path a soft update takes (and, before, every event): the reference
  copied to CPU memory, the candidate formed in it, the same two forwards;
- ``hard_copy_offloaded``: as ``hard_copy_accepted`` with ``offload_initial``: the initial model
  brought from CPU memory for the event (a no-op on a CPU run, a host-to-device copy on a GPU).

and the peak memory of an accepted event above the memory in use just before it, in one fresh
process (fp32 copies; ``_bf16``: ``frozen_dtype: bfloat16``, where the hard copy's candidate is the
policy cast to bf16): on CPU the resident set's high-water mark, reset before the event
(``/proc/self/clear_refs``), with glibc's mmap threshold fixed so that freed blocks leave the
resident set; with ``--device cuda``, ``torch.cuda.max_memory_allocated``.

Memory: the peak resident memory above the process's start (models, optimizer state,
activations) of (e) LoRA DPO with the reference as a second adapter of the same UNet (our module)
and (f) LoRA supervised fine-tuning (diffusers' ``unet.add_adapter``, one MSE forward over the
same winners and losers), each in a fresh process from the same cached batch. On CPU this is the
process's resident set (``VmHWM``); with ``--device cuda``, ``torch.cuda.max_memory_allocated``.

``--device cuda`` runs all four on the GPU (the step times then wait for the GPU to finish);
``--preset sd15-size`` has the shapes of SD1.5 (UNet 320/640/1280/1280 with 2 layers a block on
64 x 64 latents, 512 px, a 12-layer CLIP text encoder of width 768), for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from results_file import machine, write_results

from lightning_refdpo import DiffusionDPOModule, DiscountedTimestepSampler, PreferenceDataModule
from lightning_refdpo.data.latent_cache import load_latent_split, write_latent_cache
from lightning_refdpo.data.preference import PairTransform
from lightning_refdpo.losses import LossOptions, PreferenceErrors, preference_loss
from lightning_refdpo.testing import save_random_preference_set, save_tiny_stable_diffusion

PRESETS = {
    "sd-small": {
        "model": {
            "block_out_channels": (80, 160, 320, 320),
            "layers_per_block": 1,
            "cross_attention_dim": 256,
            "text_layers": 4,
            "text_intermediate_size": 1024,
            "model_max_length": 77,
            "vae_block_out_channels": (32, 64, 128, 128),
            "resolution": 256,
        },
        "pairs": 4,
        "rounds": 2,
        "steps": 4,
        "memory_steps": 2,
    },
    "sd15-size": {
        "model": {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "text_layers": 12,
            "text_intermediate_size": 3072,
            "model_max_length": 77,
            "vae_block_out_channels": (128, 256, 512, 512),
            "resolution": 512,
        },
        "pairs": 4,
        "rounds": 2,
        "steps": 4,
        "memory_steps": 2,
    },
    "tiny": {
        "model": {"resolution": 32},
        "pairs": 2,
        "rounds": 1,
        "steps": 3,
        "memory_steps": 2,
    },
}
BETA = 5000.0
LEARNING_RATE = 1e-5
LORA_RANK = 8
TAU = 32
DIVERGENCE_SAMPLES = 4
EVENT_KINDS = ("hard_copy_accepted", "hard_copy_refused", "cpu_copy_accepted", "hard_copy_offloaded")
EVENT_MEMORY_KINDS = ("event_cpu_copy", "event_hard_copy", "event_cpu_copy_bf16", "event_hard_copy_bf16")
DEVICE = torch.device("cpu")


def step_done() -> float:
    """The time once the device has finished the work queued so far."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer(Callback):
    """Seconds between the ends of consecutive training steps (the first step of a run uncounted)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = step_done()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def timed_loop(step, batches, times: list[float]) -> None:
    """Run ``step`` on each batch, appending the time between step ends (the first uncounted)."""
    last = None
    for batch in batches:
        step(batch)
        now = step_done()
        if last is not None:
            times.append(now - last)
        last = now


def make_module(model: str, **kwargs) -> DiffusionDPOModule:
    return DiffusionDPOModule(
        model, beta=BETA, learning_rate=LEARNING_RATE, scale_lr=False, reward_scale=True, **kwargs
    )


def make_data(root: Path, preset: dict, latent_cache: str | None = None) -> PreferenceDataModule:
    return PreferenceDataModule(
        dataset_name="parquet",
        data_files={"train": str(root / "train.parquet")},
        validation_split=None,
        resolution=preset["model"]["resolution"],
        timestep_sampler=DiscountedTimestepSampler(1000, gamma=0.9, num_bins=50),
        train_batch_size=preset["pairs"],
        num_workers=0,
        latent_cache=latent_cache,
    )


def fit_steps(module: DiffusionDPOModule, data: PreferenceDataModule, steps: int, timer: StepTimer) -> None:
    Trainer(
        accelerator="gpu" if DEVICE.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    ).fit(module, data)


def load_unets(model: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import UNet2DConditionModel

    policy = UNet2DConditionModel.from_pretrained(model, subfolder="unet").train().to(DEVICE)
    reference = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval().requires_grad_(False)
    return policy, reference.to(DEVICE)


def cached_batches(cache: Path, pairs: int, steps: int, seed: int):
    """``steps`` random batches of ``pairs`` rows of the cache, held in memory."""
    split = load_latent_split(cache, "train")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = split[torch.randint(len(split), (pairs,), generator=generator).tolist()]
        yield {k: v.to(DEVICE) for k, v in rows.items() if k != "caption"}


def bare_step(model: str, pairs: int):
    """(a): a step doing the unavoidable work and nothing else, on a batch of cached rows."""
    from diffusers import DDPMScheduler

    policy, reference = load_unets(model)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    scaling = json.loads((Path(model) / "vae" / "config.json").read_text())["scaling_factor"]
    sampler = DiscountedTimestepSampler(1000, gamma=0.9, num_bins=50)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE)

    def step(batch):
        mean = torch.cat([batch["latents_mean_w"], batch["latents_mean_l"]])
        std = torch.cat([batch["latents_std_w"], batch["latents_std_l"]])
        latents = (mean + std * torch.randn(mean.shape, device=DEVICE)) * scaling
        noise = torch.randn(latents[:pairs].shape, device=DEVICE).repeat(2, 1, 1, 1)
        t = sampler.sample(pairs).repeat(2).to(DEVICE)
        cond = batch["encoder_hidden_states"].repeat(2, 1, 1)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            ref_mse = (reference(noisy, t, cond).sample - noise).pow(2).mean((1, 2, 3))
        mse = (policy(noisy, t, cond).sample - noise).pow(2).mean((1, 2, 3))
        loss = preference_loss(
            PreferenceErrors(*mse.chunk(2), *ref_mse.chunk(2)), LossOptions(beta=BETA)
        ).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def public_style_step(model: str):
    """(d): a step with VAE and text encoding, a separate reference UNet, winner and loser apart."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    policy, reference = load_unets(model)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(DEVICE)
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(DEVICE)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    scaling = vae.config.scaling_factor
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE)

    def step(batch):
        pixels = torch.cat(batch["pixel_values"].to(DEVICE).chunk(2, dim=1))
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * scaling
            ids = tokenizer(
                batch["caption"],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(DEVICE)
            cond = text_encoder(ids)[0]
        latents_w, latents_l = latents.chunk(2)
        noise = torch.randn_like(latents_w)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(noise),), device=DEVICE)
        noisy_w, noisy_l = scheduler.add_noise(latents_w, noise, t), scheduler.add_noise(latents_l, noise, t)
        mse_w = F.mse_loss(policy(noisy_w, t, cond).sample, noise, reduction="none").mean((1, 2, 3))
        mse_l = F.mse_loss(policy(noisy_l, t, cond).sample, noise, reduction="none").mean((1, 2, 3))
        with torch.no_grad():
            ref_w = F.mse_loss(reference(noisy_w, t, cond).sample, noise, reduction="none").mean((1, 2, 3))
            ref_l = F.mse_loss(reference(noisy_l, t, cond).sample, noise, reduction="none").mean((1, 2, 3))
        loss = -F.logsigmoid(-0.5 * BETA * ((mse_w - mse_l) - (ref_w - ref_l))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def event_batch(root: Path, preset: dict, cache: Path) -> dict:
    """A training batch of the latent cache, as the callback receives it."""
    data = make_data(root, preset, latent_cache=str(cache))
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def event_trainer() -> Trainer:
    """What an event reads of the trainer outside a fit: its step (0), rank and strategy's reduce."""
    return Trainer(accelerator="gpu" if DEVICE.type == "cuda" else "cpu", devices=1, logger=False)


def event(module: DiffusionDPOModule, batch: dict, trainer: Trainer, kind: str) -> None:
    """One reference-update event on ``module``: ``hard_copy`` or ``cpu_copy`` (the path of a soft
    update, forced here for ``alpha = 1``), ``_accepted`` or ``_refused``."""
    from lightning_refdpo import ReferenceModelUpdate

    callback = ReferenceModelUpdate(every_n_steps=TAU, divergence_samples=DIVERGENCE_SAMPLES)
    refused = kind.endswith("_refused")
    callback.max_divergence = -1.0 if refused else None  # a cap every candidate is above, or none
    reference = module.reference
    if kind.startswith("cpu_copy"):
        reference.measures_hard_copy = lambda policy: False
    module.log_dict = lambda *args, **kwargs: None  # outside a fit there is no logger to log to
    try:
        callback.update(trainer, module, batch)
    finally:
        reference.__dict__.pop("measures_hard_copy", None)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    assert callback.num_updates == (0 if refused else 1)


def event_timer(model: str, root: Path, preset: dict, cache: Path):
    """A function that times 3 events of each of ``EVENT_KINDS`` into ``times``, on a full
    fine-tuning module and one with ``offload_initial`` (built once)."""
    batch, trainer = event_batch(root, preset, cache), event_trainer()
    module, offloaded = make_module(model).to(DEVICE), make_module(model, offload_initial=True).to(DEVICE)

    def time_events(times: dict[str, list[float]]) -> None:
        for _ in range(3):
            for kind in EVENT_KINDS:
                start = step_done()
                if kind == "hard_copy_offloaded":
                    event(offloaded, batch, trainer, "hard_copy_accepted")
                else:
                    event(module, batch, trainer, kind)
                times[kind].append(step_done() - start)

    return time_events


def peak_memory(kind: str, model: str, cache: Path, preset: dict) -> int:
    """Run in a fresh process: peak resident (CPU) or allocated (GPU) bytes above the start of (e)
    or (f) training."""
    pairs = preset["pairs"]
    start = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else _resident_bytes()
    batches = list(cached_batches(cache, pairs, preset["memory_steps"], seed=0))
    if kind == "lora_ref":
        module = make_module(model, lora_rank=LORA_RANK).to(DEVICE)
        sampler = DiscountedTimestepSampler(1000, gamma=0.9, num_bins=50)
        optimizer = torch.optim.AdamW(
            [p for p in module.policy.parameters() if p.requires_grad], lr=LEARNING_RATE
        )
        for batch in batches:
            batch["caption"] = [""] * pairs
            module.preference_step(batch, sampler.sample(pairs)).loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elif kind == "lora_sft":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel

        from lightning_refdpo.backbones import StableDiffusionBackbone

        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").requires_grad_(False).to(DEVICE)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(DEVICE)  # resident, as in the module
        CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(DEVICE)
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        unet.add_adapter(
            LoraConfig(
                r=LORA_RANK,
                lora_alpha=LORA_RANK,
                init_lora_weights="gaussian",
                target_modules=list(StableDiffusionBackbone.default_lora_targets),
            )
        )
        optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=LEARNING_RATE)
        for batch in batches:
            mean = torch.cat([batch["latents_mean_w"], batch["latents_mean_l"]])
            std = torch.cat([batch["latents_std_w"], batch["latents_std_l"]])
            latents = (mean + std * torch.randn(mean.shape, device=DEVICE)) * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (len(latents),), device=DEVICE)
            cond = batch["encoder_hidden_states"].repeat(2, 1, 1)
            F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, cond).sample, noise).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"unknown memory measurement {kind!r}; use lora_ref or lora_sft")
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() - start
    return _memory_status("VmHWM") - start


def event_peak_memory(model: str, cache: Path, preset: dict) -> dict[str, int]:
    """Run in a fresh process: for each of ``EVENT_MEMORY_KINDS``, the peak resident (CPU) or
    allocated (GPU) bytes of an accepted event above those in use just before it (after a warm-up
    event of the same kind, so first-call workspaces are not counted)."""
    batch, trainer = event_batch(cache.parent, preset, cache), event_trainer()
    modules = {dtype: make_module(model, frozen_dtype=dtype).to(DEVICE) for dtype in (None, "bfloat16")}
    peaks = {}
    for kind in EVENT_MEMORY_KINDS:
        module = modules["bfloat16" if kind.endswith("_bf16") else None]
        path = kind.removeprefix("event_").removesuffix("_bf16") + "_accepted"
        event(module, batch, trainer, path)
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the resident set now
            start = _resident_bytes()
        event(module, batch, trainer, path)
        peak = torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else _memory_status("VmHWM")
        peaks[kind] = peak - start
    return peaks


def _resident_bytes() -> int:
    return _memory_status("VmRSS")


def _memory_status(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in bytes. Unlike ``ru_maxrss``, the peak
    is not inherited from the parent across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory is measured on Linux only")


def measure_memory(preset: str, kind: str, model: str, cache: Path) -> int | dict[str, int]:
    """``peak_memory`` of ``kind``, or ``event_peak_memory`` for ``kind="events"``, in a fresh process."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--preset",
            preset,
            "--memory",
            kind,
            "--model",
            model,
            "--cache",
            str(cache),
            "--device",
            DEVICE.type,
        ],
        check=True,
        capture_output=True,
        text=True,
        # A fixed mmap threshold: glibc then returns every large freed block to the system at once,
        # so the resident set follows the live tensors (its default raises the threshold after the
        # first frees and keeps later blocks, which would hide an event's allocations from VmHWM).
        env={
            **os.environ,
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        },
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(root: Path, preset: dict) -> tuple[str, Path]:
    """The model, a preference set of random images and its latent cache, under ``root``."""
    model = str(save_tiny_stable_diffusion(root / "model", **preset["model"]))
    resolution = preset["model"]["resolution"]
    num_pairs = preset["pairs"] * preset["steps"] * 2
    save_random_preference_set(
        root / "train.parquet", num_pairs=num_pairs, resolution=resolution, tie_fraction=0.0
    )
    transform = PairTransform(resolution, random_crop=False, random_flip=False)
    pairs = make_data(root, preset).load_pairs("train", None, transform)
    backbone = make_module(model).eval().backbone.to(DEVICE)
    write_latent_cache(backbone, {"train": pairs}, root / "cache", batch_size=preset["pairs"])
    return model, root / "cache"


def main(preset_name: str, output: Path) -> dict:
    preset = PRESETS[preset_name]
    root = Path(tempfile.mkdtemp(prefix="step_cost_"))
    pairs, steps = preset["pairs"], preset["steps"] + 1
    print(f"building the {preset_name} model, data and latent cache in {root}", flush=True)
    model, cache = build(root, preset)
    module = make_module(model)
    unet_parameters = sum(p.numel() for p in module.policy.parameters())
    times: dict[str, list[float]] = {"bare": [], "module": [], "module_uncached": [], "public_style": []}
    timers = {name: StepTimer() for name in ("module", "module_uncached")}
    bare, public_style = bare_step(model, pairs), public_style_step(model)
    pixel_data = make_data(root, preset)
    pixel_data.setup("fit")
    time_events = event_timer(model, root, preset, cache)
    event_times: dict[str, list[float]] = {kind: [] for kind in EVENT_KINDS}
    for round_ in range(preset["rounds"]):
        print(f"round {round_ + 1}/{preset['rounds']}", flush=True)
        timed_loop(bare, cached_batches(cache, pairs, steps, seed=round_), times["bare"])
        fit_steps(module, make_data(root, preset, latent_cache=str(cache)), steps, timers["module"])
        fit_steps(module, make_data(root, preset), steps, timers["module_uncached"])
        loader = iter(pixel_data.train_dataloader())
        timed_loop(public_style, (next(loader) for _ in range(steps)), times["public_style"])
        time_events(event_times)
    for name, timer in timers.items():
        times[name] = timer.times
    median = {name: statistics.median(values) for name, values in times.items()}

    event_median = {kind: statistics.median(values) for kind, values in event_times.items()}

    print("measuring peak memory of LoRA DPO (reference adapter) and LoRA SFT, and of events", flush=True)
    memory = {kind: measure_memory(preset_name, kind, model, cache) for kind in ("lora_ref", "lora_sft")}
    event_memory = measure_memory(preset_name, "events", model, cache)
    results = {
        "preset": preset_name,
        "unet_parameters": unet_parameters,
        "pairs_per_step": pairs,
        "latent_size": list(load_latent_split(cache, "train")[0]["latents_mean_w"].shape),
        "step_seconds_median": median,
        "step_seconds": times,
        "steps_counted": {name: len(values) for name, values in times.items()},
        "ratio_module_vs_bare": median["module"] / median["bare"],
        "ratio_uncached_vs_bare": median["module_uncached"] / median["bare"],
        "speedup_vs_public_style": median["public_style"] / median["module"],
        "peak_memory_bytes": memory,
        "memory_ratio_lora_ref_vs_sft": memory["lora_ref"] / memory["lora_sft"],
        "reference_update_event": {
            "tau": TAU,
            "divergence_samples": DIVERGENCE_SAMPLES,
            "seconds_median": event_median,
            "seconds": event_times,
            "amortized_share_of_step": {
                kind: seconds / TAU / median["module"] for kind, seconds in event_median.items()
            },
            "peak_memory_bytes": event_memory,
            "reference_bytes": {
                dtype: unet_parameters * (4 if dtype == "fp32" else 2) for dtype in ("fp32", "bf16")
            },
        },
        "machine": machine(DEVICE.type),
    }
    print_table(results)
    write_results(results, output)
    return results


def print_table(results: dict) -> None:
    labels = {
        "bare": "(a) bare PyTorch loop, cached latents",
        "module": "(b) DiffusionDPOModule + Trainer, latent cache",
        "module_uncached": "(c) DiffusionDPOModule + Trainer, VAE/text encoding each step",
        "public_style": "(d) public-script style loop",
    }
    print(f"\n{'step':<66}{'median s':>10}{'x (a)':>8}")
    for name, label in labels.items():
        seconds = results["step_seconds_median"][name]
        print(f"{label:<66}{seconds:>10.3f}{seconds / results['step_seconds_median']['bare']:>8.2f}")
    memory = results["peak_memory_bytes"]
    print(
        f"\npeak memory: LoRA DPO with reference adapter {memory['lora_ref'] / 2**20:.0f} MiB, "
        f"LoRA SFT {memory['lora_sft'] / 2**20:.0f} MiB, ratio {results['memory_ratio_lora_ref_vs_sft']:.3f}"
    )
    print(
        f"(b)/(a) {results['ratio_module_vs_bare']:.3f}   (c)/(a) {results['ratio_uncached_vs_bare']:.3f}   "
        f"(d)/(b) {results['speedup_vs_public_style']:.3f}"
    )
    events = results["reference_update_event"]
    print(f"\nreference-update event (tau {events['tau']}, {events['divergence_samples']} winners)")
    print(f"{'event':<24}{'median s':>10}{'amortized share of a step':>28}")
    for kind, seconds in events["seconds_median"].items():
        print(f"{kind:<24}{seconds:>10.3f}{events['amortized_share_of_step'][kind]:>27.2%}")
    print("event peak memory above the memory before it:")
    for kind, peak in events["peak_memory_bytes"].items():
        print(f"  {kind:<24}{peak / 2**20:>8.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="sd-small")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "step_cost.json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    DEVICE = torch.device(args.device)
    if args.memory:
        preset = PRESETS[args.preset]
        if args.memory == "events":
            print(json.dumps(event_peak_memory(args.model, args.cache, preset)))
        else:
            print(peak_memory(args.memory, args.model, args.cache, preset))
    else:
        main(args.preset, args.output)
