"""Preference data: the Pick-a-Pic v2 schema, transforms and the DataModule."""

from lightning_refdpo.data.datamodule import PreferenceDataModule
from lightning_refdpo.data.preference import PairTransform, PreferenceCollator, PreferencePairs

__all__ = ["PairTransform", "PreferenceCollator", "PreferenceDataModule", "PreferencePairs"]
