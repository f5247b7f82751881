"""Builders of tiny models and preference sets for offline tests, the tiny config and benchmarks.

python -m lightning_refdpo.testing .tiny   # writes .tiny/model and .tiny/data/{train,validation}.parquet
"""

from lightning_refdpo.testing.models import (
    save_byte_level_clip_tokenizer,
    save_character_t5_tokenizer,
    save_tiny_sd3,
    save_tiny_sdxl,
    save_tiny_stable_diffusion,
)
from lightning_refdpo.testing.preferences import (
    encode_image,
    save_random_labeled_images,
    save_random_preference_set,
)

__all__ = [
    "encode_image",
    "save_byte_level_clip_tokenizer",
    "save_character_t5_tokenizer",
    "save_random_labeled_images",
    "save_random_preference_set",
    "save_tiny_sd3",
    "save_tiny_sdxl",
    "save_tiny_stable_diffusion",
]
