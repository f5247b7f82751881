"""The model card (``README.md``) of an exported model: base model, method, hyperparameters, figures.

The YAML front matter (``base_model``, ``library_name``, ``tags``) is the Hugging Face Hub's model
card metadata, so an export folder pushed to the Hub is linked to its base model.
"""

from __future__ import annotations

from typing import Any

from lightning_refdpo.losses import LOSSES

PAPER = "[Rethinking DPO in Diffusion Models](https://arxiv.org/abs/2505.18736)"


def method_description(
    hparams: dict[str, Any],
    reference_state: dict[str, Any] | None,
    denoiser_class: str = "UNet2DConditionModel",
) -> str:
    """One paragraph naming the objective and which of the paper's changes were used."""
    text = f"{LOSSES[hparams['loss_type']].title} (loss `{hparams['loss_type']}`, beta {hparams['beta']:g})"
    if hparams.get("winner_preserving_mu") is not None:
        text += f" with the winner-preserving safeguard of Diffusion-SDPO (mu {hparams['winner_preserving_mu']:g})"
    changes = []
    if reference_state is not None:
        changes.append(
            f"a reference model updated to the policy during training ({reference_state['num_updates']} "
            f"updates, frozen at the end: {reference_state['frozen']}, last divergence "
            f"{_number(reference_state['last_divergence'])})"
        )
    if hparams.get("reward_scale"):
        changes.append("the timestep reward scale lambda(t) = 1 + norm(1/sqrt(SNR(t)))")
    if changes:
        text += f" with the changes of {PAPER}: " + "; ".join(changes)
    adapter = (
        f"LoRA rank {hparams['lora_rank']} (alpha {hparams['lora_alpha'] or hparams['lora_rank']})"
        if hparams.get("lora_rank")
        else f"full fine-tuning of the {denoiser_class}"
    )
    return f"{text}. Trained with {adapter}."


def usage_snippet(
    weights: str,
    base_model: str,
    pipeline_class: str,
    vae: str | None,
    denoiser_class: str = "UNet2DConditionModel",
) -> str:
    """Python that loads the export with diffusers alone (every component in fp16: diffusers does
    not cast components passed to ``from_pretrained``)."""
    lines = ["import torch", f"from diffusers import {pipeline_class}"]
    components = []
    if vae:
        lines[-1] += ", AutoencoderKL"
        components.append(f'vae=AutoencoderKL.from_pretrained("{vae}", torch_dtype=torch.float16)')
    if weights != "lora":
        lines[-1] += f", {denoiser_class}"
        components.append(
            f'{weights}={denoiser_class}.from_pretrained("EXPORT_DIR", subfolder="{weights}", torch_dtype=torch.float16)'
        )
    args = ", ".join([f'"{base_model}"', *components, "torch_dtype=torch.float16"])
    lines += ["", f"pipeline = {pipeline_class}.from_pretrained({args}).to('cuda')"]
    if weights == "lora":
        lines.append('pipeline.load_lora_weights("EXPORT_DIR")')
    lines.append('image = pipeline("a photo of a cat").images[0]')
    return "\n".join(lines)


def model_card(
    *,
    base_model: str,
    pipeline_class: str,
    weights: str,
    vae: str | None,
    hparams: dict[str, Any],
    reference_state: dict[str, Any] | None,
    global_step: int,
    data_hparams: dict[str, Any] | None = None,
    training_config: str | None = None,
    evaluation: str | None = None,
    has_pipeline: bool = False,
    denoiser_class: str = "UNet2DConditionModel",
) -> str:
    """The ``README.md`` text. ``weights`` is ``lora`` or the denoiser's subfolder (``unet``,
    ``transformer``); ``evaluation`` a Markdown table (``lightning_refdpo.evaluation.results_table``)
    or ``None``."""
    family = {"StableDiffusionXL": "stable-diffusion-xl", "StableDiffusion3": "stable-diffusion-3"}
    tag = next(
        (tag for prefix, tag in family.items() if pipeline_class.startswith(prefix)), "stable-diffusion"
    )
    tags = ["text-to-image", "diffusers", tag]
    tags += ["lora"] if weights == "lora" else []
    tags += ["dpo", "diffusion-dpo", "lightning-refdpo"]
    files = (
        "`pytorch_lora_weights.safetensors`: the policy LoRA in the diffusers format"
        if weights == "lora"
        else f"`{weights}/`: the fine-tuned `{denoiser_class}` (safetensors)"
    )
    if has_pipeline:
        files += (
            f"; `model_index.json` and the other folders: the whole pipeline, fine-tuned {weights} included"
        )
    sections = [
        "---",
        f"base_model: {base_model}",
        "library_name: diffusers",
        "tags:",
        *[f"- {tag}" for tag in tags],
        "---",
        "",
        f"# {base_model} fine-tuned on preferences",
        "",
        method_description(hparams, reference_state, denoiser_class),
        f"Optimizer steps: {global_step}.",
        "",
        f"Files: {files}.",
        "",
        "## Use",
        "",
        "```python",
        usage_snippet(weights, base_model, pipeline_class, vae, denoiser_class),
        "```",
        "",
        "or `lightning_refdpo.pipeline_from_export(EXPORT_DIR)`.",
        "",
        "## Hyperparameters",
        "",
        _table(hparams),
    ]
    if data_hparams:
        sections += ["", "Data:", "", _table(data_hparams)]
    if training_config:
        sections += ["", "Training config:", "", "```yaml", training_config.strip(), "```"]
    sections += ["", "## Evaluation", "", evaluation or "No evaluation figures were given to the export."]
    return "\n".join(sections) + "\n"


def _table(values: dict[str, Any]) -> str:
    rows = [f"| `{key}` | `{value}` |" for key, value in values.items() if not key.startswith("_")]
    return "\n".join(["| name | value |", "| --- | --- |", *rows])


def _number(value: Any) -> str:
    return "none" if value is None else f"{float(value):.4g}"
