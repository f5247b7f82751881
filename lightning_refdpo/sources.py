"""Where trained models come from and where results go: Lightning checkpoints, export folders,
diffusers pipeline folders or hub ids, and writable output folders. ``export`` writes these
folders; ``evaluate`` and the callbacks read them through here, so neither imports the other."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

from lightning_refdpo.checkpoint import CheckpointError, load_checkpoint
from lightning_refdpo.hub import ModelLoadError
from lightning_refdpo.module import DiffusionDPOModule

EXPORT_INFO = "export.json"
DEFAULT_MODULE_CLASS = "lightning_refdpo.module.DiffusionDPOModule"


def open_checkpoint(ckpt_path: str | Path, unsafe_unpickle: bool = False) -> dict[str, Any]:
    """The contents of a training checkpoint, loaded weights-only
    (:func:`~lightning_refdpo.checkpoint.load_checkpoint`), after checking that the module class it
    was written by can be imported (:func:`checkpoint_module_class`)."""
    checkpoint = load_checkpoint(ckpt_path, unsafe_unpickle)
    checkpoint_module_class(checkpoint, ckpt_path)
    return checkpoint


def checkpoint_module_class(checkpoint: dict[str, Any], ckpt_path: str | Path) -> type[DiffusionDPOModule]:
    """The LightningModule class that wrote ``checkpoint``, imported: its ``module_class`` and the
    ``_class_path`` that ``LightningCLI`` stores in the hyperparameters (what Lightning instantiates).
    A class that cannot be imported, e.g. of a project not installed here, is refused with a
    :class:`~lightning_refdpo.checkpoint.CheckpointError` naming it and the fix."""
    # Checkpoints written before SDXL support do not name their class: they are all SD1.5 modules.
    name = checkpoint.get("module_class", DEFAULT_MODULE_CLASS)
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    classes = {}
    for path in dict.fromkeys(p for p in (name, class_path) if p):
        module_path, _, class_name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_path), class_name)
        except (ImportError, AttributeError) as err:
            raise CheckpointError(
                f"checkpoint {ckpt_path} was written by the module class {path}, which cannot be imported "
                f"here ({err}): install the package that provides it, or put its folder on PYTHONPATH"
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, DiffusionDPOModule)):
            raise CheckpointError(f"checkpoint {ckpt_path} names {path}, not a DiffusionDPOModule subclass")
        classes[path] = cls
    return classes[name]


def load_module(ckpt_path: str | Path, unsafe_unpickle: bool = False, **overrides: Any) -> DiffusionDPOModule:
    """The LightningModule of a training checkpoint, of the class that wrote it (SD1.5, SDXL, SD3
    or a subclass), in eval mode on CPU; ``torch.compile``, gradient checkpointing and xformers off
    unless ``overrides`` say otherwise (``overrides`` replace saved hyperparameters). The file is
    loaded weights-only unless ``unsafe_unpickle`` (see :func:`~lightning_refdpo.checkpoint.load_checkpoint`)."""
    cls = checkpoint_module_class(load_checkpoint(ckpt_path, unsafe_unpickle), ckpt_path)
    overrides = {"compile_unet": False, "gradient_checkpointing": False, "attention": "sdpa", **overrides}
    with warnings.catch_warnings():
        # The frozen parts are reloaded from the model id by design (``on_load_checkpoint`` checks the rest).
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        try:
            module = cls.load_from_checkpoint(
                str(ckpt_path), map_location="cpu", weights_only=not unsafe_unpickle, **overrides
            )
        except ModelLoadError as err:
            raise ModelLoadError(
                f"{err} If the base model has moved, pass its new place with --base_model."
            ) from None
    return module.eval()


def checkpoint_pipeline(
    ckpt_path: str | Path, base_model: str | None = None, unsafe_unpickle: bool = False, device: str = "cpu"
) -> tuple[Any, DiffusionDPOModule]:
    """The pipeline of a training checkpoint's policy with the base model's own scheduler, built on
    ``device``, and the module of :func:`load_module` (for its initial model). ``base_model``
    replaces the base model that the checkpoint names."""
    overrides = {"pretrained_model_name_or_path": base_model} if base_model else {}
    module = load_module(ckpt_path, unsafe_unpickle, **overrides).to(device)
    pipeline = module.build_pipeline()
    pipeline.scheduler = module.backbone.base_scheduler()
    return pipeline, module


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
    source: str | Path,
    base_model: str | None = None,
    unsafe_unpickle: bool = False,
    **from_pretrained_kwargs: Any,
) -> Any:
    """A ready diffusers pipeline (the base model's scheduler) from any of:

    - a Lightning checkpoint (``.ckpt``): the policy of :func:`load_module` (``torch_dtype``, if
      given, casts it), loaded weights-only unless ``unsafe_unpickle``;
    - an export folder holding a whole pipeline: ``DiffusionPipeline.from_pretrained``;
    - an export folder with LoRA or UNet weights only: the base pipeline of ``export.json`` with the
      LoRA loaded (``load_lora_weights``) or the denoiser (UNet, transformer) replaced;
    - any other diffusers pipeline folder or hub id.

    ``base_model`` replaces the base model a checkpoint or ``export.json`` names (a moved folder);
    ``from_pretrained_kwargs`` (``torch_dtype``, ``variant``, ...) go to ``from_pretrained``.
    """
    import diffusers
    from diffusers import AutoencoderKL, DiffusionPipeline

    from lightning_refdpo.hub import load_component

    path = Path(source)
    dtype = from_pretrained_kwargs.get("torch_dtype")
    if path.suffix == ".ckpt":
        pipeline = checkpoint_pipeline(path, base_model, unsafe_unpickle)[0]
        return pipeline.to(dtype) if dtype is not None else pipeline
    if (path / "model_index.json").is_file() or not (path / EXPORT_INFO).is_file():
        return load_component(DiffusionPipeline, str(source), **from_pretrained_kwargs)
    info = json.loads((path / EXPORT_INFO).read_text())
    components = {}
    if info["vae"]:
        components["vae"] = load_component(AutoencoderKL, info["vae"], torch_dtype=dtype)
    if info["weights"] != "lora":  # the denoiser's subfolder: unet, transformer
        denoiser = info["weights"]
        cls = getattr(diffusers, json.loads((path / denoiser / "config.json").read_text())["_class_name"])
        components[denoiser] = load_component(cls, str(path), denoiser, torch_dtype=dtype)
    kwargs = {"revision": info["revision"], "variant": info["variant"], **from_pretrained_kwargs}
    pipeline = load_component(DiffusionPipeline, base_model or info["base_model"], **components, **kwargs)
    if info["weights"] == "lora":
        pipeline.load_lora_weights(str(path))
    return pipeline
