"""Two peft LoRA adapters on one UNet: the trained ``policy`` and the ``reference`` of the reference
update (arXiv 2505.18736, Sec. 4.1; see docs/METHOD.md).

With the adapters disabled the UNet is the initial model, so policy, reference and initial model
cost one UNet. peft's ``set_adapter`` also flips ``requires_grad``; :func:`use_adapter` activates
an adapter for a no-grad forward and hands training back to the policy adapter, so the set of
trainable parameters (the optimizer's, and DDP's) never changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import set_adapter

POLICY = "policy"
REFERENCE = "reference"


def add_policy_and_reference(
    unet: torch.nn.Module,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    dropout: float = 0.0,
) -> None:
    """Freeze ``unet`` and attach the ``policy`` (trainable) and ``reference`` (frozen copy) adapters.

    Both start as the same zero-effect LoRA (Gaussian ``A``, zero ``B``, as in the diffusers
    training examples), so at step 0 the policy, the reference and the initial model agree.
    ``dropout`` applies to the policy only: the reference's forward must be deterministic (a
    dropped-out reference would give ``h != 0`` right after a hard copy and a noisy divergence).
    """
    unet.requires_grad_(False)

    def config(dropout: float) -> LoraConfig:
        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=list(target_modules),
        )

    unet.add_adapter(config(dropout), adapter_name=POLICY)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Already found a `peft_config`"
        )  # the second adapter is intended
        unet.add_adapter(config(0.0), adapter_name=REFERENCE)
    copy_adapter(unet, POLICY, REFERENCE)
    set_adapter(unet, POLICY)


def adapter_parameters(unet: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter ``name``, keyed by their name with the adapter name removed."""
    marker = f".{name}."
    return {key.replace(marker, "."): p for key, p in unet.named_parameters() if marker in key}


@torch.no_grad()
def copy_adapter(unet: torch.nn.Module, source: str, target: str) -> None:
    """``target <- source``, an exact copy into the target's own storage (never a view)."""
    targets = adapter_parameters(unet, target)
    for key, p in adapter_parameters(unet, source).items():
        targets[key].copy_(p)


@torch.no_grad()
def zero_adapter(unet: torch.nn.Module, name: str) -> None:
    """Make adapter ``name`` the identity: ``B = 0`` gives ``B @ A = 0``, exactly the initial model."""
    for key, p in adapter_parameters(unet, name).items():
        if ".lora_B." in key:
            p.zero_()


@contextmanager
def use_adapter(unet: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Run the UNet with adapter ``name`` (``None``: adapters disabled, the initial model) and
    restore the trainable ``policy`` adapter afterwards. Call it on the unwrapped UNet, never on a
    DDP/FSDP wrapper, and only for no-grad forwards."""
    if name is None:
        unet.disable_adapters()
    else:
        set_adapter(unet, name, inference_mode=True)
    try:
        yield
    finally:
        if name is None:
            unet.enable_adapters()
        set_adapter(unet, POLICY)
