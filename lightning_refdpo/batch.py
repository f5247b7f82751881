"""The contracts between the data, the DPO step and the callbacks: what a batch holds and what a
preference step returns."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypedDict

import torch


class PreferenceBatch(TypedDict, total=False):
    """A batch of preference pairs as the collators of ``data/`` build it; ``B`` pairs, winner first.

    Every batch has ``caption``; the images come in one of three forms (pixels, shipped latents or
    a latent cache), and training batches carry the per-pair draws.
    """

    caption: list[str]
    """The prompt of each pair (``""`` where caption dropout hit)."""
    caption_l: list[str]
    """The loser's own prompt, in a batch of unpaired labelled images (``data.unpaired``): there a
    "pair" couples a desirable image (the winner, ``caption``) with an undesirable one; only a
    per-image loss (``kto``) reads such a batch."""
    num_skipped: int
    """Pairs of this batch dropped because an image could not be decoded."""
    timesteps: torch.Tensor
    """``(B,)`` int64: the training timestep of each pair, drawn by the datamodule's sampler."""
    noise_seeds: torch.Tensor
    """``(B,)`` int64: the seed of each pair's noise and latent draws (``data/draws.py``)."""
    pixel_values: torch.Tensor
    """``(B, 6, H, W)`` in ``[-1, 1]``: the winner's RGB channels, then the loser's."""
    original_size: torch.Tensor
    """``(B, 2, 2)``: ``(h, w)`` of winner and loser before resizing (SDXL micro-conditioning)."""
    crop_top_left: torch.Tensor
    """``(B, 2, 2)``: ``(top, left)`` of the crop of winner and loser."""
    latents_w: torch.Tensor
    """``(B, C, h, w)``: exact winner latents shipped with the pairs (``data.latent_columns``)."""
    latents_l: torch.Tensor
    """``(B, C, h, w)``: exact loser latents."""
    latents_mean_w: torch.Tensor
    """``(B, C, h, w)``: VAE posterior mean of the winner, from a latent cache."""
    latents_std_w: torch.Tensor
    """``(B, C, h, w)``: VAE posterior std of the winner, from a latent cache."""
    latents_mean_l: torch.Tensor
    """``(B, C, h, w)``: VAE posterior mean of the loser, from a latent cache."""
    latents_std_l: torch.Tensor
    """``(B, C, h, w)``: VAE posterior std of the loser, from a latent cache."""
    encoder_hidden_states: torch.Tensor
    """``(B, L, D)``: cached text encoder states (the backbone's ``encode_prompts``)."""
    text_embeds: torch.Tensor
    """``(B, D)``: cached pooled text embedding (SDXL)."""
    pooled_projections: torch.Tensor
    """``(B, D)``: cached pooled text embedding (SD3)."""


@dataclass
class PreferenceStepOutput:
    """Per-pair results of ``DiffusionDPOModule.preference_step``, each of shape ``(B,)``.

    ``mse_*`` are the prediction errors ``mean ||target - m(x_t, t, c)||^2`` of the policy and
    (``ref_``) the reference on the winner (``_w``) and loser (``_l``); ``reward_margin`` is the
    implicit reward margin ``h`` against the reference, ``initial_margin`` against the initial
    model (when asked for). A loss that needs no reference (``sft``) leaves the ``ref_`` errors
    and the margin as ``None``. A per-image loss (``kto``) gives ``loss`` per image, ``(2B,)``
    winners first. ``loser_scale`` is the winner-preserving scale of the losers' gradient (a scalar,
    with ``model.winner_preserving_mu``).
    """

    loss: torch.Tensor
    mse_w: torch.Tensor
    mse_l: torch.Tensor
    reward_margin: torch.Tensor | None = None
    ref_mse_w: torch.Tensor | None = None
    ref_mse_l: torch.Tensor | None = None
    initial_margin: torch.Tensor | None = None
    loser_scale: torch.Tensor | None = None

    def summary(self) -> dict[str, torch.Tensor]:
        """Batch means (the loss averaged *after* the per-pair loss) and the implicit accuracy
        ``mean(h > 0)`` with ties ``h == 0`` counted as 1/2: a reference just copied from the policy
        gives ``h = 0`` exactly, which is a coin flip, not a miss. With ``initial_margin``, also
        ``implicit_acc_initial`` against the initial model."""
        figures = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        figures = {k: v.mean() for k, v in figures.items()}
        if self.reward_margin is not None:
            figures["implicit_acc"] = implicit_accuracy(self.reward_margin)
        if self.initial_margin is not None:
            figures["implicit_acc_initial"] = implicit_accuracy(self.initial_margin)
        return figures


def implicit_accuracy(margin: torch.Tensor) -> torch.Tensor:
    """``mean(h > 0)`` with ties ``h == 0`` counted as 1/2."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
