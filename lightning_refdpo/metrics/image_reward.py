"""ImageReward v1.0 (Xu et al., 2023, "ImageReward", NeurIPS 2023, arXiv 2304.05977) on transformers' BLIP classes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from lightning_refdpo.metrics._hub import from_pretrained, hub_file
from lightning_refdpo.metrics._mlp import RatingMLP
from lightning_refdpo.metrics.base import RewardScore, freeze, to_pil_images

#: mean and standard deviation of the raw reward that ImageReward subtracts and divides by
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: ImageReward pads or truncates every prompt to this many BERT tokens
MAX_PROMPT_TOKENS = 35
#: OpenAI CLIP normalization, which ImageReward's image transform uses
_PIXEL_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_PIXEL_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
#: BLIP's ViT (timm layout, under ``blip.visual_encoder.``) -> transformers ``BlipVisionModel``
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm(\d)\.", r"encoder.layers.\1.layer_norm\2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def _submodule_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _vision_state(visual_encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in visual_encoder.items():
        for pattern, replacement in _VISION_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _vision_config(visual_encoder: dict[str, torch.Tensor]) -> BlipVisionConfig:
    """The ViT shape read off its weights; heads are ``width / 64`` as in BLIP's ``create_vit`` (ViT-B and ViT-L)."""
    width = visual_encoder["cls_token"].shape[-1]
    patch_size = visual_encoder["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(visual_encoder["pos_embed"].shape[1] - 1)
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=visual_encoder["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1
        + max(int(key.split(".")[1]) for key in visual_encoder if key.startswith("blocks.")),
        num_attention_heads=width // 64,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT uses LayerNorm(eps=1e-6)
    )


def _text_config(med_config: dict[str, Any], encoder_width: int) -> BlipTextConfig:
    """BLIP's MED BERT (``med_config.json``) with cross-attention to image tokens of width ``encoder_width``."""
    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=encoder_width,
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally (is_decoder=False)
    )


def _pixel_values(images: list[Image.Image], size: int) -> torch.Tensor:
    """ImageReward's transform: torchvision ``Resize(size, BICUBIC)``, ``CenterCrop(size)``, ``ToTensor``, CLIP ``Normalize``."""
    arrays = []
    for image in images:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        new_width, new_height = (size, new_long) if width <= height else (new_long, size)
        image = image.resize((new_width, new_height), Image.BICUBIC)
        left, top = int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        arrays.append((np.asarray(image, dtype=np.float32) / 255.0 - _PIXEL_MEAN) / _PIXEL_STD)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class ImageReward(RewardScore):
    r"""ImageReward v1.0: BLIP (ViT-L/16 + BERT with cross-attention) with a rating MLP, trained on human rankings.

    .. math:: \mathrm{ImageReward}(x, c) = \big(\mathrm{MLP}(h_{[CLS]}(c, \mathrm{ViT}(x))) - 0.16717\big) / 1.03334

    where :math:`h_{[CLS]}` is the first output token of the BERT text encoder reading the prompt
    (35 tokens, padded) while cross-attending to all ViT output tokens, as ``ImageReward.score``
    computes it (https://github.com/THUDM/ImageReward, ``ImageReward/ImageReward.py``).

    The PyPI package ``image-reward`` cannot be used: it pins timm 0.6.13 and imports helpers
    that transformers 5 removed. This class runs the same network on transformers'
    ``BlipVisionModel`` and ``BlipTextModel`` (ports of BLIP's ViT and MED BERT) and loads the
    official checkpoint layout, i.e. the ``state_dict`` of ``ImageReward.ImageReward`` saved as
    ``ImageReward.pt``: ``blip.visual_encoder.*`` (BLIP's timm-style ViT, renamed to
    ``BlipVisionModel``; its shape is read off the weights), ``blip.text_encoder.*`` (MED BERT,
    same names as ``BlipTextModel``; its shape comes from ``med_config.json``) and
    ``mlp.layers.*``. ``blip.vision_proj`` and ``blip.text_proj`` are not used by the score and
    are ignored. The prompt tokenizer is ``bert-base-uncased`` with ``[DEC]`` and ``[ENC]`` added,
    as BLIP's ``init_tokenizer`` makes it; images are resized (shorter side, bicubic) and
    center-cropped as 8-bit PIL images, then normalized with the CLIP mean and std.

    Args:
        checkpoint_path: local ``ImageReward.pt``; when ``None`` it is fetched from ``repo_id``.
        med_config_path: local ``med_config.json``; when ``None`` it is fetched from ``repo_id``.
        tokenizer_name_or_path: hub id or local folder of the BERT tokenizer (default ``bert-base-uncased``).
        repo_id: hub repo holding ``ImageReward.pt`` and ``med_config.json`` (default ``THUDM/ImageReward``).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def __init__(
        self,
        checkpoint_path: str | None = None,
        med_config_path: str | None = None,
        tokenizer_name_or_path: str = "bert-base-uncased",
        repo_id: str = "THUDM/ImageReward",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if checkpoint_path is None:
            checkpoint_path = hub_file(
                repo_id, "ImageReward.pt", what="ImageReward checkpoint", argument="checkpoint_path"
            )
        if med_config_path is None:
            med_config_path = hub_file(
                repo_id, "med_config.json", what="ImageReward config", argument="med_config_path"
            )
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        with open(med_config_path) as file:
            med_config = json.load(file)

        visual_encoder = _submodule_state(state, "blip.visual_encoder.")
        vision_config = _vision_config(visual_encoder)
        self.vision = BlipVisionModel(vision_config)
        self.vision.load_state_dict(_vision_state(visual_encoder))
        self.text = BlipTextModel(
            _text_config(med_config, vision_config.hidden_size), add_pooling_layer=False
        )
        text_state = _submodule_state(state, "blip.text_encoder.")
        text_state.pop("embeddings.position_ids", None)  # a buffer in MED, recomputed by transformers
        self.text.load_state_dict(text_state)
        self.mlp = RatingMLP(med_config["hidden_size"])
        self.mlp.load_state_dict(_submodule_state(state, "mlp."))
        for module in (self.vision, self.text, self.mlp):
            freeze(module)

        self.tokenizer = from_pretrained(
            BertTokenizer,
            tokenizer_name_or_path,
            what="ImageReward tokenizer",
            argument="tokenizer_name_or_path",
        )
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        pixels = _pixel_values(to_pil_images(images), self.vision.config.image_size).to(self.device)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_PROMPT_TOKENS,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.text(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=self.device),
        ).last_hidden_state
        return (self.mlp(hidden[:, 0]) - REWARD_MEAN) / REWARD_STD
