"""Every loss against a hand computation or an independent float64 implementation of the public
code's formula (written out here as the script writes it: AIDC-AI/Diffusion-SDPO train.py,
huaishengzhu/DSPO train.py, jacklishufan/diffusion-kto train_kto_sd_v1.5.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_refdpo.losses import (
    LOSS_TYPES,
    LOSSES,
    LossOptions,
    PreferenceErrors,
    implicit_reward_margin,
    kto_loss,
    preference_loss,
    scale_loser_gradient,
    winner_preserving_scale,
)

# One pair, hand-computed: model_diff = 0.30 - 0.50 = -0.20, ref_diff = 0.40 - 0.45 = -0.05,
# h = -0.5 * (-0.20 + 0.05) = 0.075, and with beta = 10, z = beta * h = 0.75.
MSE = [torch.tensor([v], dtype=torch.float64) for v in (0.30, 0.50, 0.40, 0.45)]
Z = 0.75
TOL = {"rtol": 0.0, "atol": 1e-6}


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def loss(loss_type: str, errors: PreferenceErrors, **options) -> torch.Tensor:
    return preference_loss(errors, LossOptions(**options), loss_type)


def test_margin_by_hand():
    assert implicit_reward_margin(*MSE).item() == pytest.approx(0.075)
    assert implicit_reward_margin(*MSE, weights=torch.tensor([2.0])).item() == pytest.approx(0.15)


@pytest.mark.parametrize(
    ("loss_type", "options", "expected"),
    [
        ("sigmoid", {}, -log_sigmoid(Z)),
        ("sigmoid", {"label_smoothing": 0.1}, -0.9 * log_sigmoid(Z) - 0.1 * log_sigmoid(-Z)),
        ("robust", {"label_smoothing": 0.1}, (-0.9 * log_sigmoid(Z) + 0.1 * log_sigmoid(-Z)) / 0.8),
        ("ipo", {"ipo_tau": 0.25}, (Z - 2.0) ** 2),
        ("hinge", {}, 1 - Z),
        ("sft", {}, 0.30),
        ("dmpo", {"dmpo_alpha": 0.2}, None),
    ],
)
def test_loss_of_the_margin_by_hand(loss_type, options, expected):
    if loss_type == "dmpo":  # KL(Bern(p) || Bern(0.8)), p = sigmoid(0.75)
        p = 1 / (1 + math.exp(-Z))
        expected = p * math.log(p / 0.8) + (1 - p) * math.log((1 - p) / 0.2)
    assert loss(loss_type, PreferenceErrors(*MSE), beta=10.0, **options).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_hinge_is_zero_beyond_margin():
    assert loss("hinge", PreferenceErrors(*MSE), beta=100.0).item() == 0.0


def test_sigmoid_equals_diffusion_dpo_formula():
    """The loss of the Diffusion-DPO training script, written out as it is there."""
    g = torch.Generator().manual_seed(0)
    model_w, model_l, ref_w, ref_l = torch.rand(4, 16, generator=g)
    beta = 5000.0
    model_diff = model_w - model_l
    ref_diff = ref_w - ref_l
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    reference = -F.logsigmoid(inside_term).mean()
    ours = loss("sigmoid", PreferenceErrors(model_w, model_l, ref_w, ref_l), beta=beta).mean()
    torch.testing.assert_close(ours, reference)
    # The diffusers SD1.5 LoRA example drops the 0.5 and uses beta 2500: the same loss.
    diffusers_lora = -F.logsigmoid(-2500.0 * (model_diff - ref_diff)).mean()
    torch.testing.assert_close(ours, diffusers_lora)
    # The mean is outside the log-sigmoid (the public bug put it inside).
    assert not torch.allclose(ours, -F.logsigmoid(inside_term.mean()))


def test_lambda_scales_margin_per_sample():
    model_w, model_l, ref_w, ref_l = torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([1.0, 1.5, 2.0])
    scaled = loss("sigmoid", PreferenceErrors(model_w, model_l, ref_w, ref_l, weights), beta=7.0)
    manual = PreferenceErrors(model_w * weights, model_l * weights, ref_w * weights, ref_l * weights)
    torch.testing.assert_close(scaled, loss("sigmoid", manual, beta=7.0))


def test_registry_and_unknown_loss_type():
    assert LOSS_TYPES == ("sigmoid", "ipo", "hinge", "robust", "sft", "dspo", "dmpo", "kto")
    assert [k for k, v in LOSSES.items() if not v.needs_reference] == ["sft"]
    assert [k for k, v in LOSSES.items() if not v.pairwise] == ["sft", "kto"]
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust, sft, dspo, dmpo, kto"):
        loss("orpo", PreferenceErrors(*MSE), beta=1.0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"dspo_form": "sd3"}, "dspo_form must be one of sd15, sdxl"),
        ({"dmpo_alpha": 1.0}, "dmpo_alpha"),
        ({"kto_reference_point": "original"}, "kto_reference_point must be one of batch_mean, class_means"),
        ({"kto_lambda_undesirable": 0.0}, "kto_lambda_undesirable"),
        ({"beta": float("nan")}, "beta must be a finite number"),
    ],
)
def test_invalid_option_refused(options, match):
    with pytest.raises(ValueError, match=match):
        LossOptions(**{"beta": 1.0, **options})


# ---------------------------------------------------------------------- against the public code
def random_predictions(num_pairs=3, seed=0, gap=0.1):
    """float64 ``(2B, 4, 8, 8)`` policy and reference predictions and a target, winners first."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * num_pairs, 4, 8, 8, generator=g, dtype=torch.float64)
    model_pred = target + 0.5 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    ref_pred = model_pred + gap * torch.randn(target.shape, generator=g, dtype=torch.float64)
    return model_pred, ref_pred, target


def our_errors(model_pred, ref_pred, target, weights=None) -> PreferenceErrors:
    model = (model_pred - target).pow(2).mean(dim=(1, 2, 3))
    ref = (ref_pred - target).pow(2).mean(dim=(1, 2, 3))
    (pred_w, _), (ref_w, _), (target_w, _) = model_pred.chunk(2), ref_pred.chunk(2), target.chunk(2)
    return PreferenceErrors(*model.chunk(2), *ref.chunk(2), weights, pred_w - target_w, pred_w - ref_w)


def public_inside_term(model_pred, ref_pred, target, beta):
    """train.py: ``inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)``."""
    model_losses_w, model_losses_l = (model_pred - target).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    ref_losses_w, ref_losses_l = (ref_pred - target).pow(2).mean(dim=[1, 2, 3]).chunk(2)
    return -0.5 * beta * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))


def public_dspo(model_pred, ref_pred, target, beta, sdxl):
    inside_term = public_inside_term(model_pred, ref_pred, target, beta)
    pred2, _ = (model_pred - ref_pred).chunk(2)
    keep = (1 - torch.sigmoid(inside_term))[:, None, None, None]
    if sdxl:
        if pred2.pow(2).mean(dim=[1, 2, 3]).mean() >= 0.1:
            return (keep * pred2).pow(2).mean(dim=[1, 2, 3]).mean()
        return keep.pow(2).mean(dim=[1, 2, 3]).mean()
    model_diff_w, _ = (model_pred - target).chunk(2)
    return (model_diff_w - beta * keep * pred2).pow(2).mean(dim=[1, 2, 3]).mean()


@pytest.mark.parametrize(
    ("form", "beta", "gap"),
    [
        ("sd15", 0.001, 0.1),
        ("sd15", 20.0, 0.1),
        ("sdxl", 50.0, 0.5),
        ("sdxl", 50.0, 0.1),
        ("sdxl", 5000.0, 0.5),
    ],
    ids=["sd15-public-beta", "sd15-beta20", "sdxl-scored-gap", "sdxl-switched", "sdxl-public-beta"],
)
def test_dspo_equals_public_code(form, beta, gap):
    model_pred, ref_pred, target = random_predictions(gap=gap)
    assert ((model_pred - ref_pred).chunk(2)[0].pow(2).mean() >= 0.1) == (
        gap == 0.5
    )  # both sides of the switch
    ours = loss("dspo", our_errors(model_pred, ref_pred, target), beta=beta, dspo_form=form).mean()
    torch.testing.assert_close(ours, public_dspo(model_pred, ref_pred, target, beta, form == "sdxl"), **TOL)


def test_dspo_gradient_equals_public_code():
    """Gradients reach the policy prediction through z, the residual and the gap, as there."""
    grads = []
    for ours in (True, False):
        model_pred, ref_pred, target = random_predictions()
        model_pred.requires_grad_(True)
        if ours:
            value = loss("dspo", our_errors(model_pred, ref_pred, target), beta=20.0).mean()
        else:
            value = public_dspo(model_pred, ref_pred, target, 20.0, sdxl=False)
        grads.append(torch.autograd.grad(value, model_pred)[0])
    torch.testing.assert_close(grads[0], grads[1], **TOL)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.3])
def test_dmpo_equals_public_code(alpha):
    model_pred, ref_pred, target = random_predictions(num_pairs=8, gap=0.3)
    beta = 2000.0
    ut = public_inside_term(model_pred, ref_pred, target, beta)
    p = torch.sigmoid(ut)
    q = p.new(data=(1.0 - alpha,)).reshape(-1).clamp(1e-6, 1 - 1e-6)
    log_p, log_1mp = -F.softplus(-ut), -F.softplus(ut)
    public = (p * (log_p - torch.log(q)) + (1 - p) * (log_1mp - torch.log1p(-q))).mean()
    ours = loss("dmpo", our_errors(model_pred, ref_pred, target), beta=beta, dmpo_alpha=alpha).mean()
    torch.testing.assert_close(ours, public, **TOL)


def public_kto(model_losses, ref_loss, labels, beta, bce_offset, lambda_d, lambda_u, reduce=lambda x: x):
    """train_kto_sd_v1.5.py lines 1451-1492 and 1509 (``--halo sigmoid --loss kto``)."""
    g_term = -model_losses - -ref_loss
    label_sgn = 2 * labels - 1
    labels_binary = labels == 1
    kl_gpu = g_term.mean().detach()
    if bce_offset == "sigmoid":
        kl1 = reduce((labels_binary * g_term).sum().detach() / (labels_binary.sum() + 1e-6))
        kl2 = reduce(((~labels_binary) * g_term).sum().detach() / ((~labels_binary).sum() + 1e-6))
        kl = (kl1 + kl2) / 2
    else:
        kl = reduce(kl_gpu).clamp(min=0).detach()
    label_scale_g = label_sgn * beta * (g_term - kl)
    w_y = lambda_d * labels_binary + lambda_u * ~labels_binary
    return (w_y * (1 - torch.sigmoid(label_scale_g))).mean()


KTO_CASES = {
    "batch_mean": ("batch_mean", "none", 1.0, 1.0, 0.0),
    "batch_mean-clamped": ("batch_mean", "none", 1.0, 1.0, 0.05),
    "class_means": ("class_means", "sigmoid", 1.0, 1.0, 0.0),
    "lambdas": ("class_means", "sigmoid", 1.33, 0.75, 0.0),
}


@pytest.mark.parametrize(
    ("mode", "bce_offset", "lambda_d", "lambda_u", "shift"), KTO_CASES.values(), ids=KTO_CASES
)
def test_kto_equals_public_code(mode, bce_offset, lambda_d, lambda_u, shift):
    """Per image, as the public script; ``shift`` moves the batch mean of ``g`` below or above 0
    so the clamp of ``batch_mean`` acts or not."""
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(10, generator=g, dtype=torch.float64)
    model = ref + 0.02 * torch.randn(10, generator=g, dtype=torch.float64) - shift
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 1, 0, 1])
    options = {"reference_point": mode, "lambda_desirable": lambda_d, "lambda_undesirable": lambda_u}
    ours = kto_loss(model, ref, labels == 1, beta=100.0, **options).mean()
    public = public_kto(model, ref, labels, 100.0, bce_offset, lambda_d, lambda_u)
    torch.testing.assert_close(ours, public, **TOL)


@pytest.mark.parametrize("mode, bce_offset", [("batch_mean", "none"), ("class_means", "sigmoid")])
def test_kto_reference_point_is_averaged_over_ranks_like_accelerate_reduce(mode, bce_offset):
    """Under DDP each rank's mean(s) are averaged over ranks before the clamp (``accelerator.reduce``,
    mean): a stand-in for the other rank's statistics."""
    g = torch.Generator().manual_seed(4)
    ref = torch.rand(6, generator=g, dtype=torch.float64)
    model = ref + 0.05 * torch.randn(6, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 1, 0, 0])

    def other_rank(values):
        queue = list(values)
        return lambda x: (x + queue.pop(0)) / 2

    others = [torch.tensor(v, dtype=torch.float64) for v in (0.03, -0.02)]
    ours = kto_loss(
        model, ref, labels == 1, beta=50.0, reference_point=mode, mean_over_ranks=other_rank(others)
    )
    public = public_kto(model, ref, labels, 50.0, bce_offset, 1.0, 1.0, reduce=other_rank(others))
    torch.testing.assert_close(ours.mean(), public, **TOL)


def test_kto_on_pairs_is_per_image_with_winners_desirable_and_lambda_scales_the_reward():
    model_pred, ref_pred, target = random_predictions(num_pairs=4)
    weights = torch.tensor([1.0, 1.2, 1.7, 2.0], dtype=torch.float64)
    errors = our_errors(model_pred, ref_pred, target, weights)
    ours = loss("kto", errors, beta=30.0, kto_reference_point="class_means")
    assert ours.shape == (8,)
    scaled = [
        torch.cat([getattr(errors, f"{k}_w"), getattr(errors, f"{k}_l")]) * weights.repeat(2)
        for k in ("mse", "ref_mse")
    ]
    labels = torch.tensor([1] * 4 + [0] * 4)
    torch.testing.assert_close(ours.mean(), public_kto(*scaled, labels, 30.0, "sigmoid", 1.0, 1.0), **TOL)


@pytest.mark.parametrize("kind", ["desirable", "undesirable"])
def test_kto_refuses_a_batch_of_one_kind(kind):
    desirable = torch.full((4,), kind == "desirable")
    with pytest.raises(ValueError, match=f"only {kind} \\(label {int(kind == 'desirable')}\\) images"):
        kto_loss(torch.rand(4), torch.rand(4), desirable, beta=1.0)


# ---------------------------------------------------------------------- the winner-preserving safeguard
def public_scale(pred_eps, true_eps, mu, eps=1e-9, max_lambda=1.0):
    """train.py ``get_adaptive_lose_l_scale`` (lines 84-124), through autograd as there."""
    pred_w, pred_l = pred_eps.detach().requires_grad_(True).chunk(2, dim=0)
    true_w, true_l = true_eps.detach().chunk(2, dim=0)
    a = ((pred_w - true_w) ** 2).mean()
    b = ((pred_l - true_l) ** 2).mean()
    grad_a = torch.autograd.grad(a, pred_w)[0]
    grad_b = torch.autograd.grad(b, pred_l)[0]
    num = grad_a.flatten().pow(2).sum()
    den = (grad_b.flatten() * grad_a.flatten()).sum()
    lam = torch.where(
        den > 0, ((1.0 - float(mu)) * num) / (den + eps), torch.tensor(max_lambda, dtype=pred_eps.dtype)
    )
    return lam.clamp(min=0.0, max=max_lambda).detach()


def residual_pairs(alignment: str, seed: int, num_pairs: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner and loser residuals ``pred - target`` that are aligned, opposed, or aligned with a
    loser much smaller than the winner (a cap above 1, clamped)."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_pairs, 4, 8, 8)
    residual_w = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = 0.7 * torch.randn(shape, generator=g, dtype=torch.float64)
    residual_l = {
        "aligned": residual_w + noise,
        "opposed": -residual_w + noise,
        "small": 0.1 * residual_w + 0.05 * noise,
    }
    return residual_w, residual_l[alignment]


@pytest.mark.parametrize("alignment", ["aligned", "opposed", "small"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_winner_preserving_scale_equals_public_code(mu, alignment):
    residual_w, residual_l = residual_pairs(alignment, seed=5)
    target = torch.randn((6, 4, 8, 8), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    prediction = target + torch.cat([residual_w, residual_l])
    public = public_scale(prediction, target, mu)
    torch.testing.assert_close(winner_preserving_scale(residual_w, residual_l, mu), public, **TOL)
    assert {"opposed": public == 1.0, "small": public == (mu < 1), "aligned": public < 1.0 or mu == 0.0}[
        alignment
    ]


@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_winner_first_order_error_change_is_never_positive(mu):
    """``<a, -(a - lambda b)> <= -mu ||a||^2 <= 0`` for the output-space gradients ``a``, ``b`` of the
    winners' and losers' batch-mean errors, over many random draws of every alignment."""
    for seed in range(60):
        residual_w, residual_l = residual_pairs(("aligned", "opposed", "small")[seed % 3], seed)
        scale = winner_preserving_scale(residual_w, residual_l, mu)
        a, b = 2 * residual_w / residual_w.numel(), 2 * residual_l / residual_l.numel()
        change = (a * -(a - scale * b)).sum()
        assert change <= -mu * a.pow(2).sum() + 1e-15 and change <= 0


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 1.0])
def test_a_safeguarded_step_never_raises_the_winners_error(loss_type, mu):
    """End to end through the loss: one pair whose winner and loser predictions are the same free
    tensor (the output-space model: equal Jacobians). The gradient step of the safeguarded loss
    changes the winner's error by ``<dA/dtheta, -grad> <= 0``; without the safeguard it can rise."""
    raised = 0
    for seed in range(30):
        residual_w, residual_l = residual_pairs("aligned", seed, num_pairs=1)
        theta = torch.zeros_like(residual_w, requires_grad=True)
        target_w, target_l = -residual_w, -residual_l  # pred = theta = 0 at the start
        mse_w, mse_l = (
            ((theta - target_w) ** 2).mean(dim=(1, 2, 3)),
            ((theta - target_l) ** 2).mean(dim=(1, 2, 3)),
        )
        ref = mse_w.detach() + 0.01, mse_l.detach()
        for safeguard in (True, False):
            scale = winner_preserving_scale(theta - target_w, theta - target_l, mu)
            loser = scale_loser_gradient(mse_l, scale) if safeguard else mse_l
            value = loss(loss_type, PreferenceErrors(mse_w, loser, *ref), beta=5.0).sum()
            grad = torch.autograd.grad(value, theta, retain_graph=True)[0]
            winner_grad = torch.autograd.grad(mse_w.sum(), theta, retain_graph=True)[0]
            change = (winner_grad * -grad).sum()
            if safeguard:
                assert change <= 1e-15, (seed, float(change))
            else:
                raised += bool(change > 0)
    assert raised > 0, (
        "the draws never raise the winner's error without the safeguard: the test shows nothing"
    )


def test_safeguard_composes_like_the_public_code():
    """The straight-through scale of the loser branch gives the public script's gradient."""
    grads = []
    for ours in (True, False):
        model_pred, ref_pred, target = random_predictions(seed=7)
        model_pred.requires_grad_(True)
        if ours:
            errors = our_errors(model_pred, ref_pred, target)
            residual_w, residual_l = (model_pred - target).chunk(2)
            loser = scale_loser_gradient(errors.mse_l, winner_preserving_scale(residual_w, residual_l, 0.6))
            value = loss(
                "sigmoid",
                PreferenceErrors(errors.mse_w, loser, errors.ref_mse_w, errors.ref_mse_l),
                beta=50.0,
            )
            value = value.mean()
        else:
            model_losses_w, model_losses_l = (model_pred - target).pow(2).mean(dim=[1, 2, 3]).chunk(2)
            lose_l_scale = public_scale(model_pred, target, 0.6)
            scaled = model_losses_l.detach() + lose_l_scale * (model_losses_l - model_losses_l.detach())
            ref_losses_w, ref_losses_l = (ref_pred - target).pow(2).mean(dim=[1, 2, 3]).chunk(2)
            inside_term = -0.5 * 50.0 * ((model_losses_w - scaled) - (ref_losses_w - ref_losses_l))
            value = -F.logsigmoid(inside_term).mean()
        grads.append(torch.autograd.grad(value, model_pred)[0])
    torch.testing.assert_close(grads[0], grads[1], **TOL)
    assert grads[0].chunk(2)[1].abs().max() > 0, "the loser branch has a gradient"
