import pytest
import torch

from lightning_refdpo.metrics import CLIPScore


@pytest.fixture(scope="module")
def clip_score(clip_dir: str) -> CLIPScore:
    return CLIPScore(model_name_or_path=clip_dir)


@pytest.fixture(scope="module")
def expected(clip_reference) -> torch.Tensor:
    cosine = (clip_reference.image_embeds * clip_reference.text_embeds).sum(-1)
    return 100 * cosine.clamp(min=0)


def test_matches_100_times_clamped_cosine(clip_score, expected, images, pil_images, prompts):
    clip_score.reset()
    clip_score.update(images[:3], prompts[:3])
    clip_score.update(pil_images[3], prompts[3])
    torch.testing.assert_close(clip_score.scores(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(clip_score.compute(), expected.mean(), atol=1e-4, rtol=0)


def test_float_input_scores_like_uint8(clip_score, expected, images, prompts):
    clip_score.reset()
    clip_score.update(images.float() / 255, prompts)
    torch.testing.assert_close(clip_score.scores(), expected, atol=1e-4, rtol=0)


def test_reward_model_is_frozen(clip_score):
    clip_score.train()
    assert not any(p.requires_grad for p in clip_score.parameters())
    assert not any(module.training for module in clip_score.modules())


def test_offline_error_names_the_argument():
    with pytest.raises(
        OSError, match=r"could not load CLIPScore CLIP model 'no-such/model'.*model_name_or_path="
    ):
        CLIPScore(model_name_or_path="no-such/model")
