import math

import pytest
import torch

from lightning_refdpo.losses import LOSS_TYPES, implicit_reward_margin, preference_loss

# One pair, hand-computed: model_diff = 0.30 - 0.50 = -0.20, ref_diff = 0.40 - 0.45 = -0.05,
# h = -0.5 * (-0.20 + 0.05) = 0.075, and with beta = 10, z = beta * h = 0.75.
MSE = [torch.tensor([v]) for v in (0.30, 0.50, 0.40, 0.45)]
Z = 0.75


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_margin_by_hand():
    assert implicit_reward_margin(*MSE).item() == pytest.approx(0.075)
    assert implicit_reward_margin(*MSE, weights=torch.tensor([2.0])).item() == pytest.approx(0.15)


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        ("sigmoid", {}, -log_sigmoid(Z)),
        ("sigmoid", {"label_smoothing": 0.1}, -0.9 * log_sigmoid(Z) - 0.1 * log_sigmoid(-Z)),
        ("robust", {"label_smoothing": 0.1}, (-0.9 * log_sigmoid(Z) + 0.1 * log_sigmoid(-Z)) / 0.8),
        ("ipo", {"ipo_tau": 0.25}, (Z - 2.0) ** 2),
        ("hinge", {}, 1 - Z),
        ("sft", {}, 0.30),
    ],
)
def test_every_loss_type_by_hand(loss_type, kwargs, expected):
    loss = preference_loss(*MSE, beta=10.0, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hinge_is_zero_beyond_margin():
    assert preference_loss(*MSE, beta=100.0, loss_type="hinge").item() == 0.0


def test_sigmoid_equals_diffusion_dpo_formula():
    """The loss of the Diffusion-DPO training script, written out as it is there."""
    g = torch.Generator().manual_seed(0)
    model_w, model_l, ref_w, ref_l = torch.rand(4, 16, generator=g)
    beta = 5000.0
    model_diff = model_w - model_l
    ref_diff = ref_w - ref_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    reference = -torch.nn.functional.logsigmoid(inside_term).mean()
    ours = preference_loss(model_w, model_l, ref_w, ref_l, beta=beta).mean()
    torch.testing.assert_close(ours, reference)
    # The diffusers SD1.5 LoRA example drops the 0.5 and uses beta 2500: the same loss.
    diffusers_lora = -torch.nn.functional.logsigmoid(-2500.0 * (model_diff - ref_diff)).mean()
    torch.testing.assert_close(ours, diffusers_lora)
    # The mean is outside the log-sigmoid (the public bug put it inside).
    assert not torch.allclose(ours, -torch.nn.functional.logsigmoid(inside_term.mean()))


def test_lambda_scales_margin_per_sample():
    model_w, model_l, ref_w, ref_l = torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([1.0, 1.5, 2.0])
    scaled = preference_loss(model_w, model_l, ref_w, ref_l, beta=7.0, weights=weights)
    manual = preference_loss(model_w * weights, model_l * weights, ref_w * weights, ref_l * weights, beta=7.0)
    torch.testing.assert_close(scaled, manual)


def test_unknown_loss_type_names_allowed_values():
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust, sft"):
        preference_loss(*MSE, beta=1.0, loss_type="kto")
    assert LOSS_TYPES == ("sigmoid", "ipo", "hinge", "robust", "sft")


def test_invalid_label_smoothing_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(*MSE, beta=1.0, label_smoothing=0.5)
