"""LoRA on the SD3 transformer, saved and loaded the diffusers way (facts the SD3 export will rely
on), on the tiny SD3 with diffusers / peft APIs only.

Targets: the joint attention's projections of both streams, diffusers' default in
examples/dreambooth/train_dreambooth_lora_sd3.py (image stream ``to_q/k/v``, ``to_out.0``; text
stream ``add_q/k/v_proj``, ``to_add_out``, absent from the last block, which is ``context_pre_only``).
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from lightning_refdpo.testing import save_tiny_sd3

IMAGE_STREAM = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_STREAM = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
DIFFUSERS_TARGETS = [f"attn.{name}" for name in IMAGE_STREAM + TEXT_STREAM]


def generate(pipe: StableDiffusion3Pipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red square", num_inference_steps=2, generator=generator, output_type="np").images


def adapted(model: str, target_modules: list[str], rank: int = 4, alpha: float = 8.0):
    """The pipeline with a ``policy`` LoRA whose ``B`` is random (a zero ``B`` would change nothing)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    pipe.transformer.add_adapter(config, adapter_name="policy")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return pipe


def save(pipe: StableDiffusion3Pipeline, folder, with_metadata: bool = True):
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="policy"),
        transformer_lora_adapter_metadata=(
            pipe.transformer.peft_config["policy"].to_dict() if with_metadata else None
        ),
    )
    return folder


def loaded(model: str, folder) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    pipe.load_lora_weights(folder)
    return pipe


def test_save_and_load_lora_weights_reproduce_the_adapted_transformer(tiny_sd3, tmp_path):
    pipe = adapted(tiny_sd3, DIFFUSERS_TARGETS)
    images = generate(pipe)
    assert not np.allclose(images, generate(StableDiffusion3Pipeline.from_pretrained(tiny_sd3)), atol=1e-3)
    folder = save(pipe, tmp_path / "lora")
    keys = load_file(folder / "pytorch_lora_weights.safetensors").keys()
    layers = pipe.transformer.config.num_layers
    modules = {key.removesuffix(".lora_A.weight") for key in keys if key.endswith(".lora_A.weight")}
    assert all(key.startswith("transformer.transformer_blocks.") for key in keys)
    assert len(keys) == 2 * len(modules) and len(modules) == 8 * layers - 1
    assert {m.split(".attn.")[1] for m in modules} == set(IMAGE_STREAM + TEXT_STREAM)
    np.testing.assert_array_equal(generate(loaded(tiny_sd3, folder)), images)


def test_fused_lora_matches_the_adapter(tiny_sd3, tmp_path):
    pipe = adapted(tiny_sd3, DIFFUSERS_TARGETS)
    images = generate(pipe)
    fused = loaded(tiny_sd3, save(pipe, tmp_path / "lora"))
    fused.fuse_lora()
    fused.unload_lora_weights()
    assert not any(hasattr(m, "lora_A") for m in fused.transformer.modules())
    np.testing.assert_allclose(generate(fused), images, atol=1e-5)


def test_alpha_needs_the_adapter_metadata(tiny_sd3, tmp_path):
    """Without ``transformer_lora_adapter_metadata`` the loader assumes ``alpha = rank``: an adapter
    with ``alpha != rank`` comes back scaled by ``rank / alpha``."""
    pipe = adapted(tiny_sd3, DIFFUSERS_TARGETS, rank=4, alpha=8.0)
    images = generate(pipe)
    without = loaded(tiny_sd3, save(pipe, tmp_path / "bare", with_metadata=False))
    assert not np.allclose(generate(without), images, atol=1e-2)
    config = next(iter(without.transformer.peft_config.values()))
    assert config.lora_alpha == config.r == 4


@pytest.mark.parametrize(
    ("target_modules", "adapts_attn2"), [(DIFFUSERS_TARGETS, False), (IMAGE_STREAM + TEXT_STREAM, True)]
)
def test_sd35_dual_attention_is_adapted_only_by_bare_module_names(tmp_path, target_modules, adapts_attn2):
    """SD3.5 Medium's second image self-attention (``attn2``) is not matched by diffusers'
    ``attn.to_q``-style targets; the bare names cover it, and it round-trips too."""
    model = str(save_tiny_sd3(tmp_path / "model", dual_attention_layers=(0,), qk_norm="rms_norm"))
    pipe = adapted(model, target_modules)
    adapted_names = [name for name, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")]
    assert any(".attn2." in name for name in adapted_names) == adapts_attn2
    np.testing.assert_array_equal(generate(loaded(model, save(pipe, tmp_path / "lora"))), generate(pipe))
