"""Preference losses on the Diffusion-DPO implicit reward margin (Wallace et al. 2024, Eq. 14; the
reward scale of arXiv 2505.18736, Sec. 4.2). See docs/METHOD.md for every formula.

Every function here is a pure function of per-sample tensors, so it can be tested without a model.
``mse_*`` arguments are per-sample prediction errors ``mean ||target - m(x_t, t, c)||^2`` of shape
``(B,)`` for the winner (``_w``) and the loser (``_l``) of each pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_IPO_TAU = 0.1
"""IPO's regularization strength. Azar et al. (2023) and trl default to 0.1; with it the IPO target
margin ``1 / (2 tau)`` is 5 on the ``beta * h`` scale."""


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


@dataclass(frozen=True)
class PreferenceLoss:
    """One entry of :data:`LOSSES`: how a loss type is named and what it needs."""

    title: str
    """What the model card calls the objective."""
    needs_reference: bool
    """Whether the loss reads the reference model's errors; ``False`` skips the reference forward."""
    formula: Callable[[torch.Tensor, float, float], torch.Tensor] | None
    """Per-sample loss of ``z = beta * h``, ``label_smoothing`` and ``ipo_tau``; ``None`` for a loss
    that is not a function of the margin (``sft``)."""


def _sigmoid(z: torch.Tensor, eps: float, ipo_tau: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _robust(z: torch.Tensor, eps: float, ipo_tau: float) -> torch.Tensor:
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _ipo(z: torch.Tensor, eps: float, ipo_tau: float) -> torch.Tensor:
    return (z - 1 / (2 * ipo_tau)) ** 2


def _hinge(z: torch.Tensor, eps: float, ipo_tau: float) -> torch.Tensor:
    return F.relu(1 - z)


LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss("Diffusion-DPO", True, _sigmoid),
    "ipo": PreferenceLoss("Diffusion-DPO with the IPO loss", True, _ipo),
    "hinge": PreferenceLoss("Diffusion-DPO with the hinge loss", True, _hinge),
    "robust": PreferenceLoss("Diffusion-DPO with the robust-DPO loss", True, _robust),
    "sft": PreferenceLoss("supervised fine-tuning on the preferred images", False, None),
}
"""The loss types, the single source for config validation, model cards and the reference forward.
Add a loss here (and its formula) and every part of the library offers it."""

LOSS_TYPES = tuple(LOSSES)


def preference_loss(
    model_mse_w: torch.Tensor,
    model_mse_l: torch.Tensor,
    ref_mse_w: torch.Tensor | None,
    ref_mse_l: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ipo_tau: float = DEFAULT_IPO_TAU,
) -> torch.Tensor:
    """Per-sample preference loss on the margin ``h`` of :func:`implicit_reward_margin`.

    With ``z = beta * h``:

    - ``sigmoid`` (Diffusion-DPO; conservative DPO when ``label_smoothing = e > 0``):
      ``-(1 - e) log sigmoid(z) - e log sigmoid(-z)``
    - ``robust`` (robust DPO as trl defines it):
      ``(-(1 - e) log sigmoid(z) + e log sigmoid(-z)) / (1 - 2e)``
    - ``ipo``: ``(z - 1 / (2 ipo_tau))^2``
    - ``hinge``: ``relu(1 - z)``
    - ``sft``: ``mse_theta(x^w)`` (supervised fine-tuning on the winners; the reference errors may
      be ``None``)

    The 0.5 of ``h`` is kept, so ``beta = 5000`` here is the ``beta = 2500`` of the diffusers SD1.5
    LoRA example (which drops the 0.5): the same loss. Reduce with ``.mean()`` *after* this function
    (``logsigmoid(z).mean()``, never ``logsigmoid(z.mean())``).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    if ipo_tau <= 0:
        raise ValueError(f"ipo_tau must be > 0; got {ipo_tau}")
    loss = LOSSES[loss_type]
    if not loss.needs_reference:
        return model_mse_w
    z = beta * implicit_reward_margin(model_mse_w, model_mse_l, ref_mse_w, ref_mse_l, weights)
    return loss.formula(z, label_smoothing, ipo_tau)
