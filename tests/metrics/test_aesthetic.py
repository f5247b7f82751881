import pytest
import torch

from lightning_refdpo.metrics import AestheticScore

WIDTHS = [16, 1024, 128, 64, 16, 1]  # the tiny CLIP projects to 16 dims; ViT-L/14 to 768
LINEAR_LAYERS = [0, 2, 4, 6, 7]  # indices of the Linear layers in the predictor's nn.Sequential


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    weights = {}
    for index, fan_in, fan_out in zip(LINEAR_LAYERS, WIDTHS[:-1], WIDTHS[1:], strict=True):
        weights[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in**0.5
        weights[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator)
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(weights, path)
    return str(path), weights


@pytest.fixture(scope="module")
def aesthetic(clip_dir, predictor) -> AestheticScore:
    return AestheticScore(clip_name_or_path=clip_dir, predictor_path=predictor[0])


@pytest.fixture(scope="module")
def expected(clip_reference, predictor) -> torch.Tensor:
    features = clip_reference.image_embeds  # unit-norm CLIP image embeddings
    for index in LINEAR_LAYERS:  # no activations; dropout is off at inference
        features = features @ predictor[1][f"layers.{index}.weight"].T + predictor[1][f"layers.{index}.bias"]
    return features.squeeze(-1)


def test_matches_mlp_on_normalized_clip_embedding(aesthetic, expected, images, pil_images, prompts):
    aesthetic.reset()
    aesthetic.update(images[:2], prompts[:2])
    aesthetic.update(pil_images[2:])  # the prompt is not read
    torch.testing.assert_close(aesthetic.scores(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(aesthetic.compute(), expected.mean(), atol=1e-4, rtol=0)


def test_float_input_scores_like_uint8(aesthetic, expected, images):
    aesthetic.reset()
    aesthetic.update(images.float() / 255)
    torch.testing.assert_close(aesthetic.scores(), expected, atol=1e-4, rtol=0)


def test_reward_model_is_frozen(aesthetic):
    aesthetic.train()
    assert not any(p.requires_grad for p in aesthetic.parameters())
    assert not any(module.training for module in aesthetic.modules())


def test_offline_error_names_the_argument(clip_dir):
    with pytest.raises(OSError, match=r"could not fetch aesthetic predictor .*predictor_path="):
        AestheticScore(clip_name_or_path=clip_dir)
