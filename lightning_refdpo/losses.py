"""Preference objectives of the field on one margin: Diffusion-DPO (Wallace et al. 2024, Eq. 14) and
its IPO / hinge / robust / SFT variants, DSPO, DMPO and Diffusion-KTO, with the reward scale of
arXiv 2505.18736 (Sec. 4.2) and the winner-preserving safeguard of Diffusion-SDPO. See
docs/METHOD.md for every formula.

Every function here is a pure function of per-sample tensors, so it can be tested without a model.
``mse_*`` are per-sample prediction errors ``mean ||target - m(x_t, t, c)||^2`` of shape ``(B,)``
for the winner (``_w``) and the loser (``_l``) of each pair: for Diffusion-KTO the desirable and
the undesirable image.

Public code each formula was checked against (read, not copied), by commit:

- Diffusion-SDPO, ``AIDC-AI/Diffusion-SDPO`` @ 84fb241, ``train.py``: the safeguard
  (``get_adaptive_lose_l_scale``, lines 84-124, applied at 1187-1193), DSPO (1210-1219) and DMPO
  (1220-1235) on the Diffusion-DPO ``inside_term`` (1205-1206).
- DSPO, ``huaishengzhu/DSPO`` @ 8b4e09b, ``train.py`` lines 1159-1169 (the same two forms).
- Diffusion-KTO, ``jacklishufan/diffusion-kto`` @ 226bbd0, ``train_kto_sd_v1.5.py`` lines
  1451-1492 and 1508-1509 (``--loss kto --halo sigmoid``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

DEFAULT_IPO_TAU = 0.1
"""IPO's regularization strength. Azar et al. (2023) and trl default to 0.1; with it the IPO target
margin ``1 / (2 tau)`` is 5 on the ``beta * h`` scale."""

DSPO_FORMS = ("sd15", "sdxl")
DSPO_SDXL_SWITCH = 0.1
"""The SDXL form of DSPO scores the score gap while its batch mean square is at least this, else
only ``(1 - sigmoid(z))^2`` (both public scripts, ``pred2.pow(2).mean(...).mean() >= 0.1``)."""

DEFAULT_DMPO_ALPHA = 0.01
"""DMPO's target is ``q = 1 - alpha``; 0.01 is what every released Diffusion-SDPO script passes as
``--dmpo_alpha`` (the argument's default, 0, clamps ``q`` to ``1 - 1e-6``)."""
DMPO_CLAMP = 1e-6

KTO_REFERENCE_POINTS = ("batch_mean", "class_means")
"""Diffusion-KTO's reference point, from its ``--bce_offset``: ``batch_mean`` (``none``, the
default: the batch mean of ``g`` clamped at 0) or ``class_means`` (``sigmoid``: the mean of the
desirable images' mean and the undesirable images' mean of ``g``)."""

WINNER_PRESERVING_EPS = 1e-9
"""Added to the denominator of the safeguard's cap, as the public code does."""


def implicit_reward_margin(
    model_mse_w: torch.Tensor,
    model_mse_l: torch.Tensor,
    ref_mse_w: torch.Tensor,
    ref_mse_l: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample implicit reward margin of Diffusion-DPO (Wallace et al. 2024, Eq. 14).

    ``h = -0.5 * lambda(t) * ((mse_theta(x^w) - mse_theta(x^l)) - (mse_ref(x^w) - mse_ref(x^l)))``

    ``weights`` is the reward scale ``lambda(t)`` of arXiv 2505.18736 (Sec. 4.2, see
    ``timesteps.reward_scale_schedule``); ``None`` means ``lambda = 1`` (plain Diffusion-DPO).
    ``h > 0`` means the policy prefers the winner more than the reference does.
    """
    model_diff = model_mse_w - model_mse_l
    ref_diff = ref_mse_w - ref_mse_l
    margin = -0.5 * (model_diff - ref_diff)
    return margin if weights is None else weights * margin


# ---------------------------------------------------------------------- the objectives
def dspo_loss(
    z: torch.Tensor, residual_w: torch.Tensor, ref_gap_w: torch.Tensor, *, beta: float, form: str = "sd15"
) -> torch.Tensor:
    """Per-pair DSPO loss (Zhu, Xiao, Honavar, "DSPO: Direct Score Preference Optimization for
    Diffusion Model Alignment", ICLR 2025): score matching towards the policy's score shifted by
    the preference, in the two forms of the public code (``huaishengzhu/DSPO`` and
    ``AIDC-AI/Diffusion-SDPO`` ``train.py``, switched there by ``--sdxl``).

    With ``z = beta * h`` (the Diffusion-DPO ``inside_term``), ``r = m_theta(x^w) - target``
    (``residual_w``), ``d = m_theta(x^w) - m_ref(x^w)`` (``ref_gap_w``), both of shape ``(B, ...)``,
    and ``mean`` over the latent elements of a pair:

    - ``sd15``: ``mean((r - beta * (1 - sigmoid(z)) * d)^2)``; ``beta`` is on the public SD1.5
      scale (0.001), and enters both ``z`` and the shift;
    - ``sdxl``: ``(1 - sigmoid(z))^2 * mean(d^2)`` while the batch mean of ``mean(d^2)`` is at least
      :data:`DSPO_SDXL_SWITCH`, else ``(1 - sigmoid(z))^2`` (a switch of the whole batch).

    Gradients flow through ``z``, ``r`` and ``d`` alike, as there.
    """
    if form not in DSPO_FORMS:
        raise ValueError(f"dspo_form must be one of {', '.join(DSPO_FORMS)}; got {form!r}")
    keep = 1 - torch.sigmoid(z)
    shape = (-1, *[1] * (residual_w.ndim - 1))
    dims = tuple(range(1, residual_w.ndim))
    if form == "sd15":
        return (residual_w - beta * keep.reshape(shape) * ref_gap_w).pow(2).mean(dim=dims)
    gap = ref_gap_w.pow(2).mean(dim=dims)
    return keep.pow(2) * gap if gap.mean() >= DSPO_SDXL_SWITCH else keep.pow(2)


def dmpo_loss(z: torch.Tensor, alpha: float = DEFAULT_DMPO_ALPHA) -> torch.Tensor:
    """Per-pair DMPO loss (Li, Xu, Dang, Ermon, "Divergence Minimization Preference Optimization
    for Diffusion Model Alignment", arXiv 2507.07510), as the Diffusion-SDPO code writes it
    (``AIDC-AI/Diffusion-SDPO`` ``train.py`` lines 1220-1235): with ``p = sigmoid(z)``,
    ``z = beta * h``, and the target ``q = clamp(1 - alpha, 1e-6, 1 - 1e-6)``,

    ``KL(Bern(p) || Bern(q)) = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))``

    with ``log p = -softplus(-z)`` and ``log(1 - p) = -softplus(z)``.
    """
    q = min(max(1.0 - alpha, DMPO_CLAMP), 1 - DMPO_CLAMP)
    p = torch.sigmoid(z)
    return p * (-F.softplus(-z) - math.log(q)) + (1 - p) * (-F.softplus(z) - math.log1p(-q))


def kto_reference_point(
    reward: torch.Tensor,
    desirable: torch.Tensor,
    mode: str = "batch_mean",
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Diffusion-KTO's reference point ``z0`` from the batch's per-image rewards ``g`` (detached),
    as ``train_kto_sd_v1.5.py`` (lines 1459-1471) estimates it: ``batch_mean``,
    ``max(0, mean(g))``; ``class_means``, ``(mean(g | desirable) + mean(g | undesirable)) / 2``.
    Each rank's means are averaged over ranks with ``mean_over_ranks`` (its ``accelerator.reduce``)
    before the clamp or the average of the two."""
    if mode not in KTO_REFERENCE_POINTS:
        raise ValueError(
            f"kto_reference_point must be one of {', '.join(KTO_REFERENCE_POINTS)}; got {mode!r}"
        )
    average = mean_over_ranks or (lambda x: x)
    reward = reward.detach()
    if mode == "batch_mean":
        return average(reward.mean()).clamp(min=0)
    return (average(reward[desirable].mean()) + average(reward[~desirable].mean())) / 2


def kto_loss(
    model_mse: torch.Tensor,
    ref_mse: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    reference_point: str = "batch_mean",
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    weights: torch.Tensor | None = None,
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-image Diffusion-KTO loss (Li et al., "Aligning Diffusion Models by Optimizing Human
    Utility", NeurIPS 2024, arXiv 2404.04465), as ``train_kto_sd_v1.5.py`` computes it
    (``--loss kto --halo sigmoid``, lines 1451-1492):

    ``g = -lambda(t) (mse_theta - mse_ref)`` per image, ``s = +1`` for a desirable image and ``-1``
    for an undesirable one, ``z0`` = :func:`kto_reference_point` (detached), and

    ``loss = w(y) * (1 - sigmoid(beta * s * (g - z0)))``, ``w = lambda_d`` or ``lambda_u``.

    ``beta`` multiplies ``g`` itself, without the 0.5 of the Diffusion-DPO margin, as the public
    script's ``--beta_dpo`` (default 1000). ``desirable`` is a bool ``(N,)`` mask; a batch of one
    kind only is refused, as its reference point would cancel the signal it is meant to centre.
    """
    if bool(desirable.all()) or not bool(desirable.any()):
        kind = "desirable (label 1)" if bool(desirable.all()) else "undesirable (label 0)"
        raise ValueError(
            f"a kto batch holds only {kind} images; the reference point needs both kinds in every batch "
            "(train on pairs, or on unpaired images with data.unpaired: true, which couples both kinds)"
        )
    reward = ref_mse - model_mse
    if weights is not None:
        reward = weights * reward
    sign = desirable.to(reward.dtype) * 2 - 1
    centred = reward - kto_reference_point(reward, desirable, reference_point, mean_over_ranks)
    utility = torch.sigmoid(beta * sign * centred)
    weight = torch.where(desirable, lambda_desirable, lambda_undesirable).to(reward.dtype)
    return weight * (1 - utility)


def winner_preserving_scale(residual_w: torch.Tensor, residual_l: torch.Tensor, mu: float) -> torch.Tensor:
    """The loser-gradient scale ``lambda`` of Diffusion-SDPO (Fu et al., arXiv 2511.03317), as
    ``get_adaptive_lose_l_scale`` computes it (``AIDC-AI/Diffusion-SDPO`` ``train.py`` lines 84-124).

    In output space, ``a = d A / d pred_w`` and ``b = d B / d pred_l`` with ``A``, ``B`` the batch
    means of the winners' and losers' squared errors (``a = 2 r_w / n``, ``r = pred - target``,
    ``n`` the elements of all winners). The update ``-(a - lambda b)`` changes ``A`` by
    ``-(||a||^2 - lambda <a, b>)`` to first order; asking for at most ``-mu ||a||^2`` gives

    ``lambda = clamp((1 - mu) ||a||^2 / (<a, b> + 1e-9), 0, 1)`` where ``<a, b> > 0``, else 1:

    one detached scalar for the batch, ``mu`` in ``[0, 1]``. The winner's error then never rises to
    first order when winner and loser share the network's Jacobian (the paper's output-space
    approximation; winner and loser of a pair share ``x_t``'s noise, ``t`` and prompt).
    """
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"winner_preserving_mu must be in [0, 1]; got {mu}")
    residual_w, residual_l = residual_w.detach(), residual_l.detach()
    grad_w = 2 * residual_w / residual_w.numel()
    grad_l = 2 * residual_l / residual_l.numel()
    winner_norm = grad_w.pow(2).sum()
    alignment = (grad_l * grad_w).sum()
    cap = (1.0 - mu) * winner_norm / (alignment + WINNER_PRESERVING_EPS)
    return torch.where(alignment > 0, cap, torch.ones_like(cap)).clamp(0.0, 1.0)


def scale_loser_gradient(mse_l: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``mse_l`` with its value unchanged and its gradient multiplied by ``scale``:
    ``sg(mse_l) + scale * (mse_l - sg(mse_l))`` (Diffusion-SDPO ``train.py`` line 1192)."""
    return mse_l.detach() + scale * (mse_l - mse_l.detach())


# ---------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class PreferenceErrors:
    """What the preference step hands a loss: per-pair tensors of the winners (``_w``, desirable)
    and the losers (``_l``, undesirable)."""

    mse_w: torch.Tensor
    """``(B,)`` policy errors of the winners."""
    mse_l: torch.Tensor
    """``(B,)`` policy errors of the losers (the safeguard scales their gradient, not their value)."""
    ref_mse_w: torch.Tensor | None = None
    """``(B,)`` reference errors of the winners; ``None`` for a loss without reference."""
    ref_mse_l: torch.Tensor | None = None
    """``(B,)`` reference errors of the losers."""
    weights: torch.Tensor | None = None
    """``(B,)`` reward scale ``lambda(t)`` of each pair's ``t``; ``None``: 1."""
    residual_w: torch.Tensor | None = None
    """``(B, ...)`` ``m_theta(x^w) - target`` (DSPO)."""
    ref_gap_w: torch.Tensor | None = None
    """``(B, ...)`` ``m_theta(x^w) - m_ref(x^w)`` (DSPO)."""


@dataclass(frozen=True)
class LossOptions:
    """The hyperparameters of every loss (each reads its own); checked on construction, the
    message naming the field."""

    beta: float
    label_smoothing: float = 0.0
    ipo_tau: float = DEFAULT_IPO_TAU
    dspo_form: str = "sd15"
    dmpo_alpha: float = DEFAULT_DMPO_ALPHA
    kto_reference_point: str = "batch_mean"
    kto_lambda_desirable: float = 1.0
    kto_lambda_undesirable: float = 1.0
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Average a per-rank statistic over ranks (KTO's reference point); ``None``: one process."""

    def __post_init__(self) -> None:
        numbers = {f.name: getattr(self, f.name) for f in fields(self) if f.type == "float"}
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0 (Diffusion-DPO uses 5000); got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5); got {self.label_smoothing}")
        if self.ipo_tau <= 0:
            raise ValueError(f"ipo_tau must be > 0; got {self.ipo_tau}")
        if self.dspo_form not in DSPO_FORMS:
            raise ValueError(f"dspo_form must be one of {', '.join(DSPO_FORMS)}; got {self.dspo_form!r}")
        if not 0.0 <= self.dmpo_alpha < 1.0:
            raise ValueError(
                f"dmpo_alpha must be in [0, 1) (the target is q = 1 - alpha); got {self.dmpo_alpha}"
            )
        if self.kto_reference_point not in KTO_REFERENCE_POINTS:
            raise ValueError(
                f"kto_reference_point must be one of {', '.join(KTO_REFERENCE_POINTS)}; "
                f"got {self.kto_reference_point!r}"
            )
        for name in ("kto_lambda_desirable", "kto_lambda_undesirable"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")


LOSS_OPTIONS = tuple(f.name for f in fields(LossOptions) if f.name != "mean_over_ranks")
"""The loss hyperparameters a module or config sets (``mean_over_ranks`` comes from the trainer)."""


def _margin(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    """``z = beta * h``, the Diffusion-DPO ``inside_term``."""
    return options.beta * implicit_reward_margin(
        errors.mse_w, errors.mse_l, errors.ref_mse_w, errors.ref_mse_l, errors.weights
    )


def _sigmoid(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    z, eps = _margin(errors, options), options.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _robust(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    z, eps = _margin(errors, options), options.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _ipo(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    return (_margin(errors, options) - 1 / (2 * options.ipo_tau)) ** 2


def _hinge(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    return F.relu(1 - _margin(errors, options))


def _sft(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    return errors.mse_w


def _dspo(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    if errors.residual_w is None or errors.ref_gap_w is None:
        raise ValueError(
            "dspo needs the winners' residual and reference gap (PreferenceErrors.residual_w, ref_gap_w)"
        )
    z = _margin(errors, options)
    return dspo_loss(z, errors.residual_w, errors.ref_gap_w, beta=options.beta, form=options.dspo_form)


def _dmpo(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    return dmpo_loss(_margin(errors, options), options.dmpo_alpha)


def _kto(errors: PreferenceErrors, options: LossOptions) -> torch.Tensor:
    """Winners desirable, losers undesirable: one loss per image, ``(2B,)`` winners first."""
    desirable = torch.cat(
        [torch.ones_like(errors.mse_w, dtype=torch.bool), torch.zeros_like(errors.mse_l, dtype=torch.bool)]
    )
    weights = None if errors.weights is None else errors.weights.repeat(2)
    return kto_loss(
        torch.cat([errors.mse_w, errors.mse_l]),
        torch.cat([errors.ref_mse_w, errors.ref_mse_l]),
        desirable,
        beta=options.beta,
        reference_point=options.kto_reference_point,
        lambda_desirable=options.kto_lambda_desirable,
        lambda_undesirable=options.kto_lambda_undesirable,
        weights=weights,
        mean_over_ranks=options.mean_over_ranks,
    )


@dataclass(frozen=True)
class PreferenceLoss:
    """One entry of :data:`LOSSES`: how a loss type is named, what it needs and its formula."""

    title: str
    """What the model card calls the objective."""
    needs_reference: bool
    """Whether the loss reads the reference model; ``False`` skips the reference forward."""
    formula: Callable[[PreferenceErrors, LossOptions], torch.Tensor]
    """Per-sample loss (per pair; per image for a ``per_image`` loss) of the step's errors."""
    pairwise: bool = True
    """Whether the loss compares each winner with its loser (the winner-preserving safeguard,
    ``model.winner_preserving_mu``, applies to these)."""
    per_image: bool = False
    """Whether the loss reads each image's label on its own, so it also trains on unpaired
    labelled images (``data.unpaired``)."""


LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss("Diffusion-DPO", True, _sigmoid),
    "ipo": PreferenceLoss("Diffusion-DPO with the IPO loss", True, _ipo),
    "hinge": PreferenceLoss("Diffusion-DPO with the hinge loss", True, _hinge),
    "robust": PreferenceLoss("Diffusion-DPO with the robust-DPO loss", True, _robust),
    "sft": PreferenceLoss("supervised fine-tuning on the preferred images", False, _sft, pairwise=False),
    "dspo": PreferenceLoss("DSPO (direct score preference optimization)", True, _dspo),
    "dmpo": PreferenceLoss("DMPO (divergence-minimization preference optimization)", True, _dmpo),
    "kto": PreferenceLoss("Diffusion-KTO", True, _kto, pairwise=False, per_image=True),
}
"""The loss types, the single source for config validation, model cards and the reference forward.
Add a loss here (and its formula) and every part of the library offers it."""

LOSS_TYPES = tuple(LOSSES)


def preference_loss(
    errors: PreferenceErrors, options: LossOptions, loss_type: str = "sigmoid"
) -> torch.Tensor:
    """Per-sample loss ``loss_type`` of ``errors``. With ``z = beta * h`` (:func:`implicit_reward_margin`)
    and ``e = label_smoothing``:

    - ``sigmoid`` (Diffusion-DPO; conservative DPO when ``e > 0``):
      ``-(1 - e) log sigmoid(z) - e log sigmoid(-z)``
    - ``robust`` (robust DPO as trl defines it): ``(-(1 - e) log sigmoid(z) + e log sigmoid(-z)) / (1 - 2e)``
    - ``ipo``: ``(z - 1 / (2 ipo_tau))^2``
    - ``hinge``: ``relu(1 - z)``
    - ``sft``: ``mse_theta(x^w)`` (supervised fine-tuning on the winners; no reference)
    - ``dspo``: :func:`dspo_loss`; ``dmpo``: :func:`dmpo_loss`
    - ``kto``: :func:`kto_loss` per image, winners desirable and losers undesirable, ``(2B,)``

    The 0.5 of ``h`` is kept, so ``beta = 5000`` here is the ``beta = 2500`` of the diffusers SD1.5
    LoRA example (which drops the 0.5): the same loss. Reduce with ``.mean()`` *after* this function
    (``logsigmoid(z).mean()``, never ``logsigmoid(z.mean())``).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    loss = LOSSES[loss_type]
    if loss.needs_reference and (errors.ref_mse_w is None or errors.ref_mse_l is None):
        raise ValueError(
            f"loss_type {loss_type!r} needs the reference errors (PreferenceErrors.ref_mse_w, ref_mse_l)"
        )
    return loss.formula(errors, options)
