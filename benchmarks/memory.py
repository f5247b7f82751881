"""What a GPU must hold to train SD1.5 and SDXL with the paper's method, besides activations.

    python benchmarks/memory.py                      # ~1 min on CPU; writes benchmarks/results/memory.json
    python benchmarks/memory.py --device cuda --measure-step --output memory_gpu.json   # + measured peaks (GPU)

For SD1.5-size and SDXL-size models built from their configs on the ``meta`` device (no weights,
no download: the ``unet``, ``vae`` and text encoder ``config.json`` of
``stable-diffusion-v1-5/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``),
per configuration, the bytes of: the trained parameters, their gradients, the optimizer state, the
frozen weights (reference and initial copies of full fine-tuning, or the base denoiser and the
reference adapter of LoRA), the frozen backbone (VAE and text encoders, fp32, as the module keeps
them) and what ``offload_initial`` moves to CPU memory. Every figure is counted from the storages
of the tensors that the library's own code creates: the module's layouts
(``reference.CopiedReference``, ``lora.add_policy_and_reference``), and the optimizer's state after
one ``step()`` on meta tensors (``torch.optim.AdamW``, ``transformers.Adafactor`` with the
Diffusion-DPO authors' settings). ``bitsandbytes`` AdamW8bit cannot step on meta tensors: its state
is its own ``init_state`` run on them (``Optimizer8bit.init_state``, bitsandbytes 0.50): per tensor
of at least ``min_8bit_size`` = 4096 elements two uint8 moments (2 bytes an element) and two fp32
absolute maxima per block of 256 elements (8 / 256 bytes an element), smaller tensors two fp32
moments (8 bytes an element), and two shared 256-entry fp32 quantization maps; the script checks it
against that formula.

Gradient checkpointing changes activations only, none of these figures. Activations are not
counted here: ``--device cuda --measure-step`` adds, per configuration, the measured peak
(``torch.cuda.max_memory_allocated``) of one training step of the paper's method (bf16 autocast,
``ReferenceModelUpdate`` event in the step, 1 pair, 512 px for SD1.5, 1024 px for SDXL) with
gradient checkpointing on and off, each in a fresh process, on models of the same shapes saved
with random weights. ``--tiny`` runs that path on tiny models (the test suite's smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from results_file import machine, write_results

GB = 1e9
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
CLIP_L = {  # openai/clip-vit-large-patch14's text tower: SD1.5's text_encoder, SDXL's first
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
OPENCLIP_BIGG = {  # SDXL's text_encoder_2 (CLIPTextModelWithProjection)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
FAMILIES = {
    "sd15": {"unet": SD15_UNET, "text_encoders": [CLIP_L], "resolution": 512},
    "sdxl": {"unet": SDXL_UNET, "text_encoders": [CLIP_L, OPENCLIP_BIGG], "resolution": 1024},
}
PUBLISHED_UNET_PARAMETERS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
ADAFACTOR = {"weight_decay": 1e-2, "clip_threshold": 1.0, "scale_parameter": False, "relative_step": False}
LORA_RANK = 8
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# (name, trainable, optimizer, frozen dtype, initial offloaded)
CONFIGURATIONS = [
    ("full, AdamW, frozen fp32", "full", "adamw", "float32", False),
    ("full, AdamW, frozen bf16", "full", "adamw", "bfloat16", False),
    ("full, AdamW, frozen bf16, initial offloaded", "full", "adamw", "bfloat16", True),
    ("full, Adafactor, frozen bf16", "full", "adafactor", "bfloat16", False),
    ("full, Adafactor, frozen bf16, initial offloaded", "full", "adafactor", "bfloat16", True),
    ("full, AdamW8bit, frozen bf16", "full", "adamw8bit", "bfloat16", False),
    ("full, AdamW8bit, frozen bf16, initial offloaded", "full", "adamw8bit", "bfloat16", True),
    (f"LoRA rank {LORA_RANK}, AdamW", "lora", "adamw", None, False),
]
CAPACITIES_GB = (24, 48, 80)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages under ``tensors`` (a view or a shared tensor counts once)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def meta_denoiser(config: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def meta_backbone(family: dict) -> list[torch.nn.Module]:
    """The frozen VAE and text encoders of a family, on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        modules = [AutoencoderKL(**SD_VAE, sample_size=family["resolution"])]
        for config in family["text_encoders"]:
            cls = CLIPTextModelWithProjection if "projection_dim" in config else CLIPTextModel
            modules.append(cls(CLIPTextConfig(**config)))
    return modules


def optimizer_state_bytes(name: str, params: list[torch.nn.Parameter]) -> int:
    """Bytes of the optimizer state of ``params`` (meta tensors), as the optimizer itself creates it."""
    for p in params:
        p.grad = torch.empty_like(p)
    if name == "adamw8bit":
        return adamw8bit_state_bytes(params)
    if name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=1e-8, foreach=False)
    else:
        from transformers import Adafactor

        optimizer = Adafactor(params, lr=1e-8, **ADAFACTOR)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return storage_bytes(state)


def adamw8bit_state_bytes(params: list[torch.nn.Parameter], min_8bit_size: int = 4096) -> int:
    """bitsandbytes AdamW8bit's state of ``params``: its ``init_state`` on the meta tensors where the
    package is installed, checked against the formula of its layout (module docstring)."""
    blocks = [(p.numel() + 255) // 256 for p in params]
    small = [p.numel() < min_8bit_size for p in params]
    formula = sum(
        8 * p.numel() if is_small else 2 * p.numel() + 8 * n_blocks
        for p, is_small, n_blocks in zip(params, small, blocks, strict=True)
    ) + (2 * 256 * 4 if not all(small) else 0)
    try:
        import bitsandbytes
    except ImportError:
        return formula
    optimizer = bitsandbytes.optim.AdamW8bit(params, lr=1e-8, min_8bit_size=min_8bit_size)
    for index, p in enumerate(params):
        optimizer.init_state(optimizer.param_groups[0], p, 0, index)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    counted = storage_bytes(state)
    if counted != formula:
        raise RuntimeError(
            f"bitsandbytes {bitsandbytes.__version__} keeps {counted} bytes, the formula {formula}"
        )
    return counted


def count(family_name: str, trainable: str, optimizer: str, frozen_dtype: str | None, offload: bool) -> dict:
    """The bytes of one configuration (``CONFIGURATIONS``) of ``family_name``."""
    from lightning_refdpo import lora
    from lightning_refdpo.reference import CopiedReference

    family = FAMILIES[family_name]
    policy = meta_denoiser(family["unet"])
    backbone = storage_bytes(t for m in meta_backbone(family) for t in m.parameters())
    if trainable == "lora":
        with torch.device("meta"):
            lora.add_policy_and_reference(policy, LORA_RANK, LORA_RANK, LORA_TARGETS)
        trained = [p for p in policy.parameters() if p.requires_grad]
        frozen_on_device = storage_bytes(p for p in policy.parameters() if not p.requires_grad)
        offloaded = 0
    else:
        reference = CopiedReference(policy, getattr(torch, frozen_dtype), offload_initial=offload)
        trained = list(policy.parameters())
        frozen_on_device = storage_bytes(reference.parameters())
        offloaded = storage_bytes(reference.initial_model.parameters()) if offload else 0
    figures = {
        "trained_parameters": storage_bytes(trained),
        "gradients": 0,
        "optimizer_state": optimizer_state_bytes(optimizer, trained),
        "frozen_weights": frozen_on_device,
        "backbone": backbone,
        "offloaded_to_cpu": offloaded,
    }
    figures["gradients"] = storage_bytes(p.grad for p in trained)
    figures["on_device"] = sum(
        figures[k]
        for k in ("trained_parameters", "gradients", "optimizer_state", "frozen_weights", "backbone")
    )
    # DDP (the recipes' strategy) allocates its gradient buckets beside the gradients unless
    # gradient_as_bucket_view=True makes the gradients views into them.
    figures["on_device_ddp_buckets"] = figures["on_device"] + figures["gradients"]
    return figures


def fits(figures: dict, capacity_gb: int) -> str:
    """``yes +X`` (the state fits beside DDP's default buckets, X GB left for activations and the
    CUDA context), ``view +X`` (only with DDP's ``gradient_as_bucket_view: true``, or on one GPU)
    or ``no``, on a card of ``capacity_gb`` GiB."""
    capacity = capacity_gb * 2**30
    if figures["on_device_ddp_buckets"] <= capacity:
        return f"yes +{(capacity - figures['on_device_ddp_buckets']) / GB:.1f}"
    if figures["on_device"] <= capacity:
        return f"view +{(capacity - figures['on_device']) / GB:.1f}"
    return "no"


# ---------------------------------------------------------------------------------- measured peaks
def save_sized_pipeline(root: Path, family_name: str, tiny: bool) -> Path:
    """A pipeline folder of the family's shapes with random weights (``tiny``: the test models)."""
    from lightning_refdpo.testing import save_tiny_sdxl, save_tiny_stable_diffusion

    if tiny:
        return (save_tiny_sdxl if family_name == "sdxl" else save_tiny_stable_diffusion)(root / family_name)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lightning_refdpo.testing.models import save_byte_level_clip_tokenizer

    family, path = FAMILIES[family_name], root / family_name
    UNet2DConditionModel(**family["unet"]).save_pretrained(path / "unet")
    AutoencoderKL(**SD_VAE, sample_size=family["resolution"]).save_pretrained(path / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        path / "scheduler"
    )
    for index, config in enumerate(family["text_encoders"]):
        suffix = "" if index == 0 else f"_{index + 1}"
        save_byte_level_clip_tokenizer(path / f"tokenizer{suffix}", 77)
        cls = CLIPTextModelWithProjection if "projection_dim" in config else CLIPTextModel
        cls(CLIPTextConfig(**config)).save_pretrained(path / f"text_encoder{suffix}")
    pipeline_class = "StableDiffusionXLPipeline" if family_name == "sdxl" else "StableDiffusionPipeline"
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return path


def measured_step_peak(
    model: str, family_name: str, configuration: str, checkpointing: bool, resolution: int, device: str
) -> int:
    """Run in a fresh process: the peak bytes of one training step of the paper's method (with a
    reference-update event) at ``resolution`` above the process's start, on ``device``."""
    from lightning.pytorch import Trainer

    from lightning_refdpo import (
        DiffusionDPOModule,
        DiscountedTimestepSampler,
        PreferenceDataModule,
        ReferenceModelUpdate,
        StableDiffusionXLDPOModule,
    )
    from lightning_refdpo.testing import save_random_preference_set

    _, trainable, optimizer, frozen_dtype, offload = next(c for c in CONFIGURATIONS if c[0] == configuration)
    data_file = save_random_preference_set(
        Path(tempfile.mkdtemp()) / "train.parquet", num_pairs=2, resolution=resolution, tie_fraction=0.0
    )
    optimizers = {
        "adamw": None,
        "adafactor": {"class_path": "transformers.Adafactor", "init_args": ADAFACTOR},
        "adamw8bit": {"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"weight_decay": 1e-2}},
    }
    start = torch.cuda.memory_allocated() if device == "cuda" else _memory_status("VmRSS")
    module_class = StableDiffusionXLDPOModule if family_name == "sdxl" else DiffusionDPOModule
    module = module_class(
        model,
        learning_rate=1e-8,
        scale_lr=False,
        reward_scale=True,
        optimizer=optimizers[optimizer],
        lora_rank=LORA_RANK if trainable == "lora" else None,
        frozen_dtype=frozen_dtype,
        offload_initial=offload,
        gradient_checkpointing=checkpointing,
    )
    data = PreferenceDataModule(
        dataset_name="parquet",
        data_files={"train": str(data_file)},
        validation_split=None,
        resolution=resolution,
        timestep_sampler=DiscountedTimestepSampler(1000, gamma=0.9, num_bins=50),
        train_batch_size=1,
        num_workers=0,
    )
    Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ReferenceModelUpdate(every_n_steps=1, max_divergence=0.005)],
    ).fit(module, data)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _memory_status("VmHWM")
    return peak - start


def _memory_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory is measured on Linux only")


def measure_steps(device: str, tiny: bool, configurations: list[str], checkpointing: list[bool]) -> dict:
    """``measured_step_peak`` of each family, configuration and checkpointing setting, each in a
    fresh process."""
    root = Path(tempfile.mkdtemp(prefix="memory_"))
    peaks: dict = {}
    for family_name in FAMILIES:
        model = str(save_sized_pipeline(root, family_name, tiny))
        resolution = 32 if tiny else FAMILIES[family_name]["resolution"]
        for configuration in configurations:
            for checkpoints in checkpointing:
                step = [family_name, configuration, str(checkpoints), str(resolution)]
                args = [sys.executable, __file__, "--step", *step]
                out = subprocess.run(
                    [*args, "--model", model, "--device", device],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "HF_HUB_OFFLINE": "1"},
                )
                key = f"{configuration}, checkpointing {'on' if checkpoints else 'off'}"
                peaks.setdefault(family_name, {})[key] = int(out.stdout.strip().splitlines()[-1])
                print(f"{family_name} {key}: {peaks[family_name][key] / GB:.2f} GB", flush=True)
    return peaks


# ---------------------------------------------------------------------------------- main
def main(
    output: Path,
    device: str,
    measure_step: bool,
    tiny: bool,
    configurations: list[str],
    checkpointing: list[bool],
) -> dict:
    results: dict = {"families": {}, "configurations": configurations}
    for family_name in FAMILIES:
        rows = {}
        for configuration in (c for c in CONFIGURATIONS if c[0] in configurations):
            rows[configuration[0]] = count(family_name, *configuration[1:])
            print(f"counted {family_name}: {configuration[0]}", flush=True)
        unet_parameters = sum(p.numel() for p in meta_denoiser(FAMILIES[family_name]["unet"]).parameters())
        if unet_parameters != PUBLISHED_UNET_PARAMETERS[family_name]:
            raise RuntimeError(f"{family_name} UNet has {unet_parameters} parameters, not the published size")
        results["families"][family_name] = {"unet_parameters": unet_parameters, "bytes": rows}
    results["measured_step_peak_bytes"] = (
        measure_steps(device, tiny, configurations, checkpointing)
        if measure_step
        else "not measured (needs --measure-step)"
    )
    results["machine"] = machine(device)
    print_table(results)
    write_results(results, output)
    return results


def print_table(results: dict) -> None:
    """The counts as a markdown table (GB = 1e9 bytes), the one in benchmarks/README.md."""
    columns = ("trained_parameters", "gradients", "optimizer_state", "frozen_weights", "backbone")
    header = ["model", "configuration", "trained", "grads", "optimizer", "frozen", "VAE + text"]
    header += ["on GPU", "+ DDP buckets", "offloaded to CPU"] + [f"{c} GiB" for c in CAPACITIES_GB]
    print("\n| " + " | ".join(header) + " |")
    print("| --- | --- |" + " ---: |" * (len(header) - 2))
    for family_name, family in results["families"].items():
        for name, figures in family["bytes"].items():
            numbers = [figures[c] for c in columns]
            numbers += [figures["on_device"], figures["on_device_ddp_buckets"], figures["offloaded_to_cpu"]]
            cells = [family_name, name, *(f"{n / GB:.2f}" for n in numbers)]
            cells += [fits(figures, c) for c in CAPACITIES_GB]
            print("| " + " | ".join(cells) + " |")
    if isinstance(results["measured_step_peak_bytes"], dict):
        print("\n| model | configuration | measured peak of one step, GB |\n| --- | --- | ---: |")
        for family_name, peaks in results["measured_step_peak_bytes"].items():
            for name, peak in peaks.items():
                print(f"| {family_name} | {name} | {peak / GB:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--measure-step", action="store_true", help="also measure one training step's peak")
    parser.add_argument("--tiny", action="store_true", help="measure steps on tiny models (smoke test)")
    parser.add_argument(
        "--configurations",
        nargs="+",
        default=[c[0] for c in CONFIGURATIONS],
        choices=[c[0] for c in CONFIGURATIONS],
        help="the configurations counted (and measured)",
    )
    parser.add_argument(
        "--checkpointing", nargs="+", choices=("on", "off"), default=["on", "off"], help="measured steps"
    )
    parser.add_argument("--step", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.step:
        family_name, configuration, checkpointing, resolution = args.step
        print(
            measured_step_peak(
                args.model, family_name, configuration, checkpointing == "True", int(resolution), args.device
            )
        )
    else:
        checkpointing = [value == "on" for value in args.checkpointing]
        main(args.output, args.device, args.measure_step, args.tiny, args.configurations, checkpointing)
