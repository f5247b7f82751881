import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from lightning_refdpo.metrics import ImageReward
from lightning_refdpo.metrics.image_reward import _pixel_values
from tests.helpers import not_installed

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
HEAD_WIDTHS = [32, 1024, 128, 64, 16, 1]
HEAD_LAYERS = [0, 2, 4, 6, 7]


def official_state_dict(vision: BlipVisionModel, text: BlipTextModel, head: dict) -> dict[str, torch.Tensor]:
    """The layout of THUDM's ``ImageReward.pt``: BLIP's timm-style ViT, MED BERT, projections, rating MLP."""
    state = {
        "blip.visual_encoder.cls_token": vision.embeddings.class_embedding,
        "blip.visual_encoder.pos_embed": vision.embeddings.position_embedding,
        "blip.visual_encoder.patch_embed.proj.weight": vision.embeddings.patch_embedding.weight,
        "blip.visual_encoder.patch_embed.proj.bias": vision.embeddings.patch_embedding.bias,
        "blip.visual_encoder.norm.weight": vision.post_layernorm.weight,
        "blip.visual_encoder.norm.bias": vision.post_layernorm.bias,
        "blip.vision_proj.weight": torch.randn(4, vision.config.hidden_size),
        "blip.vision_proj.bias": torch.randn(4),
        "blip.text_proj.weight": torch.randn(4, text.config.hidden_size),
        "blip.text_proj.bias": torch.randn(4),
        "blip.text_encoder.embeddings.position_ids": torch.arange(text.config.max_position_embeddings)[None],
    }
    for i, layer in enumerate(vision.encoder.layers):
        for official, module in [
            ("norm1", layer.layer_norm1),
            ("attn.qkv", layer.self_attn.qkv),
            ("attn.proj", layer.self_attn.projection),
            ("norm2", layer.layer_norm2),
            ("mlp.fc1", layer.mlp.fc1),
            ("mlp.fc2", layer.mlp.fc2),
        ]:
            state[f"blip.visual_encoder.blocks.{i}.{official}.weight"] = module.weight
            state[f"blip.visual_encoder.blocks.{i}.{official}.bias"] = module.bias
    state.update({f"blip.text_encoder.{key}": value for key, value in text.state_dict().items()})
    state.update({f"mlp.{key}": value for key, value in head.items()})
    return {key: value.detach().clone() for key, value in state.items()}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, prompts):
    folder = tmp_path_factory.mktemp("tiny-image-reward")
    words = sorted({word for prompt in prompts for word in prompt.split()})
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n"
    )
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder / "tokenizer")
    med_config = {
        "architectures": ["BertModel"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 40,
        "vocab_size": 5 + len(words) + 2,  # + [DEC] and [ENC], as in the real med_config.json (30522 + 2)
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "add_cross_attention": True,
        "encoder_width": 768,
    }
    (folder / "med_config.json").write_text(json.dumps(med_config))

    torch.manual_seed(3)
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-6,
        )
    ).eval()
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med_config["vocab_size"],
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
            encoder_hidden_size=128,
            is_decoder=True,
        ),
        add_pooling_layer=False,
    ).eval()
    head = {}
    for index, fan_in, fan_out in zip(HEAD_LAYERS, HEAD_WIDTHS[:-1], HEAD_WIDTHS[1:], strict=True):
        head[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in) / fan_in**0.5
        head[f"layers.{index}.bias"] = torch.randn(fan_out)
    torch.save(official_state_dict(vision, text, head), folder / "ImageReward.pt")
    return folder, vision, text, head


@pytest.fixture(scope="module")
def image_reward(assets) -> ImageReward:
    folder = assets[0]
    return ImageReward(
        checkpoint_path=str(folder / "ImageReward.pt"),
        med_config_path=str(folder / "med_config.json"),
        tokenizer_name_or_path=str(folder / "tokenizer"),
    )


@pytest.fixture(scope="module")
def square_images() -> torch.Tensor:
    """Images at the model's input size, so ImageReward's transform is only the CLIP normalization."""
    return torch.randint(
        0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )


@pytest.fixture(scope="module")
def expected(assets, square_images, prompts) -> torch.Tensor:
    folder, vision, text, head = assets
    pixels = (square_images.float() / 255 - CLIP_MEAN) / CLIP_STD
    tokens = BertTokenizer.from_pretrained(folder / "tokenizer")(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        image_tokens = vision(pixel_values=pixels).last_hidden_state
        cls = text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_tokens,
        ).last_hidden_state[:, 0]
    for index in HEAD_LAYERS:
        cls = cls @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    return (cls.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_matches_blip_cross_attention_reward(image_reward, expected, square_images, prompts):
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in square_images[2:]]
    image_reward.reset()
    image_reward.update(square_images[:2], prompts[:2])
    image_reward.update(pil, prompts[2:])
    torch.testing.assert_close(image_reward.scores(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(image_reward.compute(), expected.mean(), atol=1e-4, rtol=0)


def test_float_input_scores_like_uint8(image_reward, expected, square_images, prompts):
    image_reward.reset()
    image_reward.update(square_images.float() / 255, prompts)
    torch.testing.assert_close(image_reward.scores(), expected, atol=1e-4, rtol=0)


def test_reward_model_is_frozen(image_reward):
    image_reward.train()
    assert not any(p.requires_grad for p in image_reward.parameters())
    assert not any(module.training for module in image_reward.modules())


def test_transform_matches_torchvision(pil_images):
    transforms = pytest.importorskip("torchvision.transforms", reason=not_installed("torchvision"))
    reference = transforms.Compose(
        [
            transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN.flatten().tolist(), CLIP_STD.flatten().tolist()),
        ]
    )
    tall = [image.transpose(Image.Transpose.ROTATE_90) for image in pil_images]
    for batch in (pil_images, tall):
        expected = torch.stack([reference(image) for image in batch])
        np.testing.assert_allclose(_pixel_values(batch, 32).numpy(), expected.numpy(), atol=1e-5)


def test_offline_error_names_the_argument():
    with pytest.raises(
        OSError, match=r"could not fetch ImageReward checkpoint 'ImageReward.pt'.*checkpoint_path="
    ):
        ImageReward()
