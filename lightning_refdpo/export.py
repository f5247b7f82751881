"""Export a training checkpoint to a folder that diffusers loads with its own API, and load it back.

    lightning-refdpo export outputs/.../last.ckpt --output exports/refdpo [--pipeline true]

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

import json
from pathlib import Path

from lightning_refdpo.checkpoint import load_checkpoint
from lightning_refdpo.evaluation.report import results_table
from lightning_refdpo.model_card import model_card
from lightning_refdpo.sources import (
    EXPORT_INFO,
    check_writable_folder,
    load_module,
    pipeline_from_export,
)

# ``pipeline_from_export`` is read from here by the model cards that version 0.1 wrote.
__all__ = ["export_checkpoint", "pipeline_from_export"]


def export_checkpoint(
    ckpt_path: str,
    *,
    output: str,
    pipeline: bool = False,
    evaluation: str | None = None,
    base_model: str | None = None,
    unsafe_unpickle: bool = False,
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
        unsafe_unpickle: unpickle the checkpoint whole (``torch.load(weights_only=False)``), which
            RUNS ANY CODE the file holds: only for a file you trust. By default it is loaded
            weights-only and refused if it holds other objects
            (``lightning_refdpo.checkpoint.load_checkpoint``).
    """
    results = json.loads(Path(evaluation).read_text()) if evaluation else None
    if results is not None:
        check_evaluation_of(results, ckpt_path, evaluation)
    check_writable_folder(output, "--output")
    checkpoint = load_checkpoint(ckpt_path, unsafe_unpickle)
    overrides = {"pretrained_model_name_or_path": base_model} if base_model else {}
    module = load_module(ckpt_path, unsafe_unpickle, **overrides)
    hp = {**module.hparams, **checkpoint["hyper_parameters"], **overrides}  # as trained, not as reloaded
    output_dir = Path(output)
    weights = module.reference.save_policy(module.policy, module.backbone, output_dir)
    pipeline_class = type(module.build_pipeline()).__name__
    if pipeline:
        full = module.build_pipeline(module.reference.plain_policy(module.policy))
        full.scheduler = module.backbone.base_scheduler()
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
        denoiser_class=type(module.policy).__name__,
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
