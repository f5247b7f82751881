"""Where the reference and the initial model live: a second LoRA adapter, or copies of the denoiser.

arXiv 2505.18736 trains a policy ``theta`` against a reference ``ref`` that moves during training
and measures how far it moved from the initial model ``init`` (Sec. 4.1). A strategy owns the
layout of ``ref`` and ``init`` beside the policy and offers the same operations for both
layouts: no-grad forwards of each, ``update(alpha)``, ``reset()``, a CPU copy of the reference to
undo an update, and which state-dict keys a checkpoint must keep.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lightning_refdpo import lora


class ReferenceStrategy(torch.nn.Module, ABC):
    """The reference and initial models of a policy denoiser (registered as the module's
    ``reference``). Every operation takes the policy as the module holds it now, so a strategy
    never keeps a stale handle on a denoiser that a distributed strategy has wrapped."""

    uses_lora: bool

    @abstractmethod
    @contextmanager
    def reference(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The reference denoiser, for a no-grad forward."""

    @abstractmethod
    @contextmanager
    def initial(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The initial (pretrained) denoiser, for a no-grad forward."""

    @abstractmethod
    def update(self, policy: torch.nn.Module, alpha: float = 1.0) -> None:
        """``ref <- (1 - alpha) ref + alpha theta``; ``alpha = 1`` is the hard copy of TR-DPO."""

    @abstractmethod
    def reset(self, policy: torch.nn.Module) -> None:
        """``ref <- init`` (the paper's "Re-Init" ablation)."""

    @abstractmethod
    def reference_parameters(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The reference's weights, by name."""

    @abstractmethod
    def keeps(self, key: str) -> bool:
        """Whether the module state-dict ``key`` goes into a checkpoint: the policy's trained weights
        and the reference, never what reloads from the model id."""

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules that stay in eval mode while the policy trains."""
        return []

    def check_sharding(self, policy: torch.nn.Module, sharded: bool) -> None:
        """Refuse a layout that the trainer's strategy cannot run (``sharded``: FSDP)."""

    def check_update(self, policy: torch.nn.Module, alpha: float) -> None:
        """Refuse an update ``alpha`` that this layout cannot take exactly."""

    @abstractmethod
    def save_policy(self, policy: torch.nn.Module, backbone: Any, output: Path) -> str:
        """Write the policy for diffusers into ``output`` (``backbone``: a ``Backbone``, for the
        pipeline's layout); returns what was written: ``lora`` or the denoiser's subfolder."""

    @abstractmethod
    def plain_policy(self, policy: torch.nn.Module) -> torch.nn.Module:
        """A denoiser computing the policy with no adapters (for a whole pipeline)."""

    def dtype(self, policy: torch.nn.Module) -> torch.dtype:
        """The dtype the reference weights are stored in."""
        return next(iter(self.reference_parameters(policy).values())).dtype

    def state(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A copy of the reference weights in CPU memory (to undo a rejected update without a second
        reference on the accelerator)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.reference_parameters(policy).items()}

    @torch.no_grad()
    def load_state(self, policy: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        for key, p in self.reference_parameters(policy).items():
            p.copy_(state[key])


class LoRAReference(ReferenceStrategy):
    """The reference is a second peft adapter (``reference``) on the policy's denoiser, the initial
    model is the denoiser with its adapters disabled (``lora.py``): three models for one denoiser.

    Only ``alpha = 1`` updates are exact (a mix of ``A`` and ``B`` factors is not the mix of
    ``B @ A``), so any other value is refused.
    """

    uses_lora = True

    def __init__(
        self, policy: torch.nn.Module, rank: int, alpha: float, target_modules: Sequence[str], dropout: float
    ) -> None:
        super().__init__()
        lora.add_policy_and_reference(policy, rank, alpha, target_modules, dropout)

    @contextmanager
    def reference(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with lora.use_adapter(policy, lora.REFERENCE):
            yield policy

    @contextmanager
    def initial(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        with lora.use_adapter(policy, None):
            yield policy

    @torch.no_grad()
    def update(self, policy: torch.nn.Module, alpha: float = 1.0) -> None:
        self.check_update(policy, alpha)
        lora.copy_adapter(policy, lora.POLICY, lora.REFERENCE)

    @torch.no_grad()
    def reset(self, policy: torch.nn.Module) -> None:
        lora.zero_adapter(policy, lora.REFERENCE)

    def reference_parameters(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        return lora.adapter_parameters(policy, lora.REFERENCE)

    def keeps(self, key: str) -> bool:
        return key.startswith("policy.") and "lora_" in key

    def check_update(self, policy: torch.nn.Module, alpha: float) -> None:
        if alpha != 1.0:
            raise ValueError(
                f"ReferenceModelUpdate.alpha={alpha} is a soft update, which is not exact on LoRA factors; "
                "use alpha: 1.0 with LoRA, or full fine-tuning (lora_rank: null) for a soft update"
            )

    def save_policy(self, policy: torch.nn.Module, backbone: Any, output: Path) -> str:
        """``pytorch_lora_weights.safetensors``: the ``policy`` adapter in the layout the pipeline's
        ``load_lora_weights`` reads (``backbone.lora_layers``), saved by the pipeline class's
        ``save_lora_weights`` with the adapter's ``LoraConfig`` as metadata, so alpha is kept exactly."""
        from peft.utils import get_peft_model_state_dict

        layers = backbone.lora_layers(get_peft_model_state_dict(policy, adapter_name=lora.POLICY))
        layers = {k: v.detach().float().contiguous() for k, v in layers.items()}
        name = backbone.denoiser_name
        type(backbone.build_pipeline(policy)).save_lora_weights(
            str(output),
            **{
                f"{name}_lora_layers": layers,
                f"{name}_lora_adapter_metadata": policy.peft_config[lora.POLICY].to_dict(),
            },
            safe_serialization=True,
        )
        return "lora"

    def plain_policy(self, policy: torch.nn.Module) -> torch.nn.Module:
        """A copy of the denoiser with the ``policy`` adapter merged and every adapter removed."""
        denoiser = copy.deepcopy(policy)
        denoiser.fuse_lora(adapter_names=[lora.POLICY])
        denoiser.unload_lora()
        return denoiser

    def check_sharding(self, policy: torch.nn.Module, sharded: bool) -> None:
        if sharded:
            raise ValueError(
                "model.lora_rank with FSDPStrategy is not supported (the policy and reference adapters "
                "share FSDP units, so the reference update cannot copy shard to shard); LoRA adapters "
                "are small: use trainer.strategy: ddp"
            )


class CopiedReference(ReferenceStrategy):
    """Full fine-tuning: ``model`` (the reference) and ``initial_model`` are frozen copies of the policy
    denoiser, in ``dtype`` (``None``: the policy's)."""

    uses_lora = False

    def __init__(self, policy: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = _frozen_copy(policy, dtype)
        self.initial_model = _frozen_copy(policy, dtype)

    @contextmanager
    def reference(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        yield self.model

    @contextmanager
    def initial(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        yield self.initial_model

    @torch.no_grad()
    def update(self, policy: torch.nn.Module, alpha: float = 1.0) -> None:
        for ref, theta in zip(self.model.parameters(), policy.parameters(), strict=True):
            ref.lerp_(theta.to(ref.dtype), alpha)

    @torch.no_grad()
    def reset(self, policy: torch.nn.Module) -> None:
        self.model.load_state_dict(self.initial_model.state_dict())

    def reference_parameters(self, policy: torch.nn.Module) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    @torch.no_grad()
    def load_state(self, policy: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def keeps(self, key: str) -> bool:
        return key.startswith(("policy.", "reference.model."))

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.model, self.initial_model]

    def check_update(self, policy: torch.nn.Module, alpha: float) -> None:
        dtype = self.dtype(policy)
        if alpha != 1.0 and dtype.itemsize < 4:
            raise ValueError(
                f"ReferenceModelUpdate.alpha={alpha} with a {dtype} reference (model.frozen_dtype): 16-bit "
                "rounding would swallow the small steps of a soft update; use frozen_dtype: null (or "
                "float32), or alpha: 1.0"
            )

    def save_policy(self, policy: torch.nn.Module, backbone: Any, output: Path) -> str:
        """The policy denoiser in its subfolder (``unet/``, ``transformer/``), safetensors."""
        policy.save_pretrained(output / backbone.denoiser_name, safe_serialization=True)
        return backbone.denoiser_name

    def plain_policy(self, policy: torch.nn.Module) -> torch.nn.Module:
        return policy

    def check_sharding(self, policy: torch.nn.Module, sharded: bool) -> None:
        """Refuse a reference sharded unlike the policy (FSDP wrapping them differently)."""
        pairs = zip(self.model.parameters(), policy.parameters(), strict=True)
        if any(ref.shape != p.shape for ref, p in pairs):
            raise ValueError(
                "the reference denoiser is sharded unlike the policy; with FSDPStrategy add the denoiser "
                "class (e.g. diffusers.UNet2DConditionModel) to trainer.strategy.init_args.auto_wrap_policy "
                "(see configs/sdxl/fsdp.yaml)"
            )


def _frozen_copy(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    frozen = copy.deepcopy(module).requires_grad_(False).eval()
    return frozen.to(dtype) if dtype is not None else frozen
