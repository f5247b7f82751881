"""Callbacks: the reference-model update (and, later, evaluation)."""

from lightning_refdpo.callbacks.reference_update import ReferenceModelUpdate

__all__ = ["ReferenceModelUpdate"]
