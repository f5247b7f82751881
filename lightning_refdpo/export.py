"""Export a training checkpoint to a folder that diffusers loads with its own API, and load it back.

    lightning-refdpo export --ckpt_path outputs/.../last.ckpt --output exports/refdpo [--pipeline true]

What goes into the export folder (only the trained ``policy``; never the reference):

- LoRA runs: ``pytorch_lora_weights.safetensors``, the ``policy`` adapter in the diffusers LoRA
  format with its ``LoraConfig`` (rank, alpha, target modules) as metadata, as diffusers' own LoRA
  training scripts save it: ``pipeline.load_lora_weights(DIR)`` on the base pipeline.
- Full fine-tuning: ``unet/``, the policy ``UNet2DConditionModel`` (``save_pretrained``,
  safetensors): ``UNet2DConditionModel.from_pretrained(DIR, subfolder="unet")`` passed as
  ``unet=`` to the base pipeline's ``from_pretrained``.
- ``pipeline=True``: also the whole pipeline (``model_index.json`` and every component; a LoRA
  merged into the UNet, the base model's own scheduler, no safety checker), so that
  ``DiffusionPipeline.from_pretrained(DIR)`` alone loads the fine-tuned model.
- ``README.md``: the model card (``model_card.py``); ``export.json``: what :func:`pipeline_from_export`
  needs (base model, revision, variant, VAE, weights kind).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lightning_refdpo import lora
from lightning_refdpo.hub import ModelLoadError
from lightning_refdpo.model_card import model_card
from lightning_refdpo.module import DiffusionDPOModule

EXPORT_INFO = "export.json"
DEFAULT_MODULE_CLASS = "lightning_refdpo.module.DiffusionDPOModule"


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, memory-mapped (cheap even for full fine-tuning checkpoints).
    A Lightning checkpoint holds Python objects: load only checkpoints you trust."""
    return torch.load(str(ckpt_path), map_location="cpu", mmap=True, weights_only=False)


def load_module(ckpt_path: str | Path, **overrides: Any) -> DiffusionDPOModule:
    """The LightningModule of a training checkpoint, of the class that wrote it (SD1.5 or SDXL),
    in eval mode on CPU; ``torch.compile``, gradient checkpointing and xformers off unless
    ``overrides`` say otherwise (``overrides`` replace saved hyperparameters)."""
    # Checkpoints written before SDXL support do not name their class: they are all SD1.5 modules.
    name = read_checkpoint(ckpt_path).get("module_class", DEFAULT_MODULE_CLASS)
    module_path, _, class_name = name.rpartition(".")
    cls = getattr(importlib.import_module(module_path), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionDPOModule)):
        raise TypeError(f"checkpoint {str(ckpt_path)!r} names {name!r}, not a DiffusionDPOModule subclass")
    overrides = {"compile_unet": False, "gradient_checkpointing": False, "attention": "sdpa", **overrides}
    with warnings.catch_warnings():
        # The frozen parts are reloaded from the model id by design (``on_load_checkpoint`` checks the rest).
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        try:
            module = cls.load_from_checkpoint(
                str(ckpt_path), map_location="cpu", weights_only=False, **overrides
            )
        except ModelLoadError as err:
            raise ModelLoadError(
                f"{err} If the base model has moved, pass its new place with --base_model."
            ) from None
    return module.eval()


def base_scheduler(module: DiffusionDPOModule) -> Any:
    """The base model's own sampler (e.g. ``EulerDiscreteScheduler`` for SDXL), not the training
    ``DDPMScheduler``."""
    import diffusers

    hp = module.hparams
    config = diffusers.DDPMScheduler.load_config(
        hp.pretrained_model_name_or_path, subfolder="scheduler", revision=hp.revision
    )
    return getattr(diffusers, config["_class_name"]).from_config(config)


def merged_policy_unet(module: DiffusionDPOModule) -> torch.nn.Module:
    """A plain ``UNet2DConditionModel`` computing the policy: with LoRA, a copy of the UNet with the
    ``policy`` adapter merged into its weights and every adapter removed; else the policy UNet."""
    if not module.uses_lora:
        return module.unet
    unet = copy.deepcopy(module.unet)
    unet.fuse_lora(adapter_names=[lora.POLICY])
    unet.unload_lora()
    return unet


def save_lora(module: DiffusionDPOModule, output: str | Path) -> Path:
    """Write the ``policy`` adapter as ``pytorch_lora_weights.safetensors`` in the diffusers LoRA
    format (peft state dict -> ``convert_state_dict_to_diffusers`` -> the pipeline class's
    ``save_lora_weights``), with the adapter's ``LoraConfig`` as metadata so alpha is kept exactly."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(module.unet, adapter_name=lora.POLICY))
    layers = {k: v.detach().float().contiguous() for k, v in layers.items()}
    type(module.build_pipeline()).save_lora_weights(
        str(output),
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=module.unet.peft_config[lora.POLICY].to_dict(),
        safe_serialization=True,
    )
    return Path(output)


def export_checkpoint(
    ckpt_path: str,
    output: str,
    pipeline: bool = False,
    evaluation: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Export the policy of a training checkpoint for diffusers, with a model card.

    The card holds the hyperparameters, the reference-update state and, when present, the run's
    ``config.yaml`` that ``LightningCLI`` saved beside the ``checkpoints/`` folder.

    Args:
        ckpt_path: a Lightning checkpoint written by ``lightning-refdpo fit``.
        output: the export folder (created; files of a previous export are overwritten).
        pipeline: also write the whole pipeline, loadable by ``DiffusionPipeline.from_pretrained``.
        evaluation: a ``results.json`` of ``lightning-refdpo evaluate`` of this checkpoint (or of an
            export of it) whose figures go into the model card; results of another model are refused.
        base_model: the base model's hub id or folder, instead of the one the checkpoint names (a
            folder that has moved).
    """
    from lightning_refdpo.evaluation import results_table

    results = json.loads(Path(evaluation).read_text()) if evaluation else None
    if results is not None:
        check_evaluation_of(results, ckpt_path, evaluation)
    check_writable_folder(output, "--output")
    checkpoint = read_checkpoint(ckpt_path)
    overrides = {"pretrained_model_name_or_path": base_model} if base_model else {}
    module = load_module(ckpt_path, **overrides)
    hp = {**module.hparams, **checkpoint["hyper_parameters"], **overrides}  # as trained, not as reloaded
    output_dir = Path(output)
    weights = "lora" if module.uses_lora else "unet"
    if module.uses_lora:
        save_lora(module, output_dir)
    else:
        module.unet.save_pretrained(output_dir / "unet", safe_serialization=True)
    pipeline_class = type(module.build_pipeline()).__name__
    if pipeline:
        full = module.build_pipeline(merged_policy_unet(module))
        full.scheduler = base_scheduler(module)
        full.save_pretrained(output_dir, safe_serialization=True)
    info = {
        "base_model": hp["pretrained_model_name_or_path"],
        "revision": hp["revision"],
        "variant": hp["variant"],
        "vae": hp["vae_name_or_path"],
        "weights": weights,
        "pipeline_class": pipeline_class,
        "checkpoint": str(Path(ckpt_path).resolve()),
    }
    (output_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    training_config = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    card = model_card(
        base_model=info["base_model"],
        pipeline_class=pipeline_class,
        weights=weights,
        vae=info["vae"],
        hparams=hp,
        reference_state=checkpoint.get("callbacks", {}).get("ReferenceModelUpdate"),
        global_step=checkpoint.get("global_step", 0),
        data_hparams=checkpoint.get("datamodule_hyper_parameters"),
        training_config=training_config.read_text() if training_config.is_file() else None,
        evaluation=results_table(results) if results else None,
        has_pipeline=pipeline,
    )
    (output_dir / "README.md").write_text(card)
    print(f"exported the {weights} policy of {ckpt_path} to {output_dir}")
    return output_dir


def check_evaluation_of(results: dict, ckpt_path: str | Path, evaluation: str | Path) -> None:
    """Refuse evaluation ``results`` of a model other than checkpoint ``ckpt_path``: their ``model``
    must be that checkpoint or an export folder written from it (its ``export.json``)."""
    evaluated = Path(str(results.get("model", "")))
    checkpoint = Path(ckpt_path).resolve()
    info = evaluated / EXPORT_INFO
    source = json.loads(info.read_text()).get("checkpoint") if info.is_file() else str(evaluated.resolve())
    if source is None or Path(source).resolve() != checkpoint:
        raise ValueError(
            f"--evaluation {evaluation} holds the results of {results.get('model')!r}, not of {ckpt_path}; "
            f"evaluate this checkpoint first: lightning-refdpo evaluate {ckpt_path} ..."
        )


def check_writable_folder(folder: str | Path, option: str) -> Path:
    """Create ``folder`` and check that a file can be written in it, before any long work."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"{option} {folder} is not a writable folder: {err.strerror or err}") from None
    return path


def check_model_source(source: str, option: str) -> str:
    """``source`` if it can be a model for ``evaluate``: a checkpoint file, an export folder, a
    diffusers pipeline folder, or a hub id (``owner/name``) that is not a local path. Local paths
    come back absolute (so ``results.json`` names them wherever it is read). Anything else is
    refused before a model is loaded."""
    path = Path(source)
    if path.is_file() and path.suffix == ".ckpt":
        return str(path.resolve())
    if path.is_dir() and ((path / EXPORT_INFO).is_file() or (path / "model_index.json").is_file()):
        return str(path.resolve())
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) and path.suffix != ".ckpt":
        return source
    kind = (
        "no such file or folder"
        if not path.exists()
        else "neither a .ckpt checkpoint nor an export or pipeline folder"
    )
    raise ValueError(
        f"{option} {source}: {kind} (expected a checkpoint of lightning-refdpo fit, a folder of "
        "lightning-refdpo export, a diffusers pipeline folder or a hub id)"
    )


def pipeline_from_export(
    source: str | Path, base_model: str | None = None, **from_pretrained_kwargs: Any
) -> Any:
    """A ready diffusers pipeline (the base model's scheduler) from any of:

    - a Lightning checkpoint (``.ckpt``): the policy of :func:`load_module` (``torch_dtype``, if
      given, casts it);
    - an export folder holding a whole pipeline: ``DiffusionPipeline.from_pretrained``;
    - an export folder with LoRA or UNet weights only: the base pipeline of ``export.json`` with the
      LoRA loaded (``load_lora_weights``) or the UNet replaced;
    - any other diffusers pipeline folder or hub id.

    ``base_model`` replaces the base model a checkpoint or ``export.json`` names (a moved folder);
    ``from_pretrained_kwargs`` (``torch_dtype``, ``variant``, ...) go to ``from_pretrained``.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    from lightning_refdpo.hub import load_component

    path = Path(source)
    dtype = from_pretrained_kwargs.get("torch_dtype")
    if path.suffix == ".ckpt":
        module = load_module(path, **({"pretrained_model_name_or_path": base_model} if base_model else {}))
        pipeline = module.build_pipeline()
        pipeline.scheduler = base_scheduler(module)
        return pipeline.to(dtype) if dtype is not None else pipeline
    if (path / "model_index.json").is_file() or not (path / EXPORT_INFO).is_file():
        return load_component(DiffusionPipeline, str(source), **from_pretrained_kwargs)
    info = json.loads((path / EXPORT_INFO).read_text())
    components = {}
    if info["vae"]:
        components["vae"] = load_component(AutoencoderKL, info["vae"], torch_dtype=dtype)
    if info["weights"] == "unet":
        components["unet"] = load_component(UNet2DConditionModel, str(path), "unet", torch_dtype=dtype)
    kwargs = {"revision": info["revision"], "variant": info["variant"], **from_pretrained_kwargs}
    pipeline = load_component(DiffusionPipeline, base_model or info["base_model"], **components, **kwargs)
    if info["weights"] == "lora":
        pipeline.load_lora_weights(str(path))
    return pipeline
