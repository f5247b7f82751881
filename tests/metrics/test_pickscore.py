import pytest
import torch

from lightning_refdpo.metrics import PickScore


@pytest.fixture(scope="module")
def pickscore(clip_dir: str) -> PickScore:
    return PickScore(model_name_or_path=clip_dir, processor_name_or_path=clip_dir)


def test_matches_logit_scale_times_cosine(pickscore, clip_reference, images, pil_images, prompts):
    expected = clip_reference.logits_per_image.diagonal()  # logit_scale.exp() * cos, per pair
    pickscore.reset()
    pickscore.update(images[:2], prompts[:2])
    pickscore.update(pil_images[2:], prompts[2:])
    torch.testing.assert_close(pickscore.scores(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(pickscore.compute(), expected.mean(), atol=1e-4, rtol=0)


def test_float_input_scores_like_uint8(pickscore, clip_reference, images, prompts):
    pickscore.reset()
    pickscore.update(images.float() / 255, prompts)
    torch.testing.assert_close(
        pickscore.scores(), clip_reference.logits_per_image.diagonal(), atol=1e-4, rtol=0
    )


def test_reward_model_is_frozen(pickscore):
    pickscore.train()
    assert not any(p.requires_grad for p in pickscore.parameters())
    assert not any(module.training for module in pickscore.modules())
    assert set(pickscore.state_dict()) == set()


def test_offline_error_names_the_argument(clip_dir):
    with pytest.raises(
        OSError, match=r"could not load PickScore CLIP model 'no-such/model'.*model_name_or_path="
    ):
        PickScore(model_name_or_path="no-such/model", processor_name_or_path=clip_dir)
