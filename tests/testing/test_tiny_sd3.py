"""The tiny SD3 builder: an SD3-layout folder that StableDiffusion3Pipeline loads back and runs on CPU,
with and without T5, and its offline T5 tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from transformers import T5TokenizerFast

from lightning_refdpo.testing import save_character_t5_tokenizer, save_tiny_sd3


def generate(pipe: StableDiffusion3Pipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red square", num_inference_steps=2, generator=generator, output_type="np").images


def test_tiny_sd3_loads_back_in_the_sd3_layout_and_generates(tiny_sd3):
    index = json.loads((Path(tiny_sd3) / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.shift_factor, vae.scaling_factor) == (16, 0.0609, 1.5305)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert pipe.scheduler.config.shift == 3.0
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model
    images = generate(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, generate(pipe))


def test_dropping_t5_changes_the_image(tiny_sd3):
    """Loaded without T5, the pipeline feeds zeros for its sequence: another image, same shape."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    images = generate(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert not np.allclose(images, generate(StableDiffusion3Pipeline.from_pretrained(tiny_sd3)))


def test_tiny_sd3_without_t5(tmp_path):
    path = save_tiny_sd3(tmp_path / "model", with_t5=False)
    assert not (path / "text_encoder_3").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    assert generate(pipe).shape == (1, 32, 32, 3)


def test_tiny_sd35_blocks(tmp_path):
    """SD3.5 Medium's MMDiT-X: dual attention in the first blocks and RMS-normed q/k."""
    path = save_tiny_sd3(tmp_path / "model", dual_attention_layers=(0,), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    assert pipe.transformer.transformer_blocks[0].attn2 is not None
    assert np.isfinite(generate(pipe)).all()


def test_character_t5_tokenizer(tmp_path):
    tokenizer = T5TokenizerFast.from_pretrained(save_character_t5_tokenizer(tmp_path, model_max_length=12))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a cat", padding="max_length", max_length=12, truncation=True).input_ids
    assert len(ids) == 12 and ids[ids.index(1) + 1 :] == [0] * (12 - ids.index(1) - 1)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat"
    assert tokenizer("\u00e9").input_ids[-2] == tokenizer.unk_token_id


def test_t5_width_must_hold_both_clip_widths(tmp_path):
    with pytest.raises(ValueError, match="t5_hidden_size"):
        save_tiny_sd3(tmp_path, text_hidden_sizes=(32, 32), t5_hidden_size=48)
