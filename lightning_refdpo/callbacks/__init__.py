"""Callbacks: the reference-model update, reward evaluation and the implicit-reward analysis."""

from lightning_refdpo.callbacks.implicit_reward import ImplicitRewardByTimestep
from lightning_refdpo.callbacks.preference_evaluation import PreferenceEvaluation
from lightning_refdpo.callbacks.reference_update import ReferenceModelUpdate

__all__ = ["ImplicitRewardByTimestep", "PreferenceEvaluation", "ReferenceModelUpdate"]
