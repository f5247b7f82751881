"""Where the reference and the initial model live: a second LoRA adapter, or copies of the denoiser.

arXiv 2505.18736 trains a policy ``theta`` against a reference ``ref`` that moves during training
and measures how far it moved from the initial model ``init`` (Sec. 4.1). A strategy owns the
layout of ``ref`` and ``init`` beside the policy and offers the same operations for both
layouts: no-grad forwards of each and of the hard-copy candidate (the policy as the reference would
store it), ``update(alpha)``, ``reset()``, a CPU copy of the reference to undo a soft update, and
which state-dict keys a checkpoint must keep.
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

    def load_initial(self, device: torch.device) -> None:
        """Keep the initial model on ``device`` until :meth:`unload_initial` (only an offloaded one
        moves)."""

    def unload_initial(self) -> None:
        """End a :meth:`load_initial`."""

    @abstractmethod
    @contextmanager
    def hard_copy(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The candidate of a hard copy (``update(policy, 1.0)``) for a no-grad forward, computing
        what the reference would after the copy, without changing the reference."""

    def measures_hard_copy(self, policy: torch.nn.Module) -> bool:
        """Whether :meth:`hard_copy` is available (else a hard copy is measured in the reference and
        undone from :meth:`state`)."""
        return True

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
        """A copy of the reference weights in CPU memory (to undo a rejected soft update without a
        second reference on the accelerator)."""
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

    @contextmanager
    def hard_copy(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The policy adapter itself: the copy is exact and both adapters have the same rank and
        scaling (its dropout is off in eval mode, where the update event runs)."""
        with lora.use_adapter(policy, lora.POLICY):
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
    denoiser, in ``dtype`` (``None``: the policy's).

    With ``offload_initial`` the initial model stays in CPU memory (pinned where CUDA is available),
    out of the module's parameters, so ``.to(device)``, DDP and checkpoints never see it, and is
    brought to the policy's device only inside :meth:`initial` (update events, validation margins,
    the evaluation baseline) or between :meth:`load_initial` and :meth:`unload_initial` (a
    validation epoch). Bringing it in copies its weights to the device once; sending it back drops
    that copy (the CPU weights never change).
    """

    uses_lora = False

    def __init__(
        self, policy: torch.nn.Module, dtype: torch.dtype | None = None, offload_initial: bool = False
    ) -> None:
        super().__init__()
        self.model = _frozen_copy(policy, dtype)
        self.offload_initial = offload_initial
        self.sharded = False
        self._initial_users = 0
        self._initial_on_host: list[torch.Tensor] = []
        if offload_initial:  # a plain attribute: not a submodule, so not moved, wrapped or saved
            object.__setattr__(self, "initial_model", _frozen_copy(policy, dtype))
        else:
            self.initial_model = _frozen_copy(policy, dtype)

    @contextmanager
    def reference(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        yield self.model

    @contextmanager
    def initial(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        self.load_initial(next(policy.parameters()).device)
        try:
            yield self.initial_model
        finally:
            self.unload_initial()

    @torch.no_grad()
    def load_initial(self, device: torch.device) -> None:
        """Bring an offloaded initial model to ``device`` (in the reference's dtype) until the matching
        :meth:`unload_initial`; calls nest."""
        self._initial_users += 1
        if not self.offload_initial or self._initial_users > 1:
            return
        dtype = next(self.model.parameters()).dtype
        tensors = _tensors(self.initial_model)
        self._initial_on_host = [t.data for t in tensors]
        for t in tensors:
            host = t.data.pin_memory() if device.type == "cuda" and not t.data.is_pinned() else t.data
            t.data = host.to(device=device, dtype=dtype if t.is_floating_point() else None, non_blocking=True)

    def unload_initial(self) -> None:
        """Send the initial model back to CPU memory once its last user is done."""
        self._initial_users -= 1
        if not self.offload_initial or self._initial_users > 0:
            return
        for t, host in zip(_tensors(self.initial_model), self._initial_on_host, strict=True):
            t.data = host
        self._initial_on_host = []

    def measures_hard_copy(self, policy: torch.nn.Module) -> bool:
        """Not under FSDP with a reference dtype other than the policy's: the candidate would be cast
        shard by shard into parameters that FSDP writes back into its own flat storage."""
        return not self.sharded or self.dtype(policy) == next(policy.parameters()).dtype

    @contextmanager
    def hard_copy(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The policy itself where the reference has the policy's dtype; otherwise the reference
        module running on the policy's weights cast to the reference's dtype (what ``update``
        would store), one reference-sized allocation on the device for the duration of the forward,
        the reference's own weights put back after it."""
        dtype = self.dtype(policy)
        if all(p.dtype == dtype for p in policy.parameters()):
            yield policy
            return
        parameters = list(self.model.parameters())
        own = [p.data for p in parameters]
        with torch.no_grad():
            for ref, theta in zip(parameters, policy.parameters(), strict=True):
                ref.data = theta.detach().to(dtype)
        try:
            yield self.model
        finally:
            for ref, data in zip(parameters, own, strict=True):
                ref.data = data

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
        """Refuse a reference sharded unlike the policy (FSDP wrapping them differently), and an
        offloaded initial model under FSDP (it would come in whole, unsharded, on every rank)."""
        self.sharded = sharded
        if sharded and self.offload_initial:
            raise ValueError(
                "model.offload_initial with FSDPStrategy is not supported: FSDP already keeps 1/world_size "
                "of the initial model on each GPU, and an offloaded one would come in whole on every rank; "
                "set offload_initial: false (or use FSDP's own cpu_offload)"
            )
        pairs = zip(self.model.parameters(), policy.parameters(), strict=True)
        if any(ref.shape != p.shape for ref, p in pairs):
            raise ValueError(
                "the reference denoiser is sharded unlike the policy; with FSDPStrategy add the denoiser "
                "class (e.g. diffusers.UNet2DConditionModel) to trainer.strategy.init_args.auto_wrap_policy "
                "(see configs/sdxl/fsdp.yaml)"
            )


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _frozen_copy(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    frozen = copy.deepcopy(module).requires_grad_(False).eval()
    return frozen.to(dtype) if dtype is not None else frozen
