"""open_clip, imported on first use: the optional dependency of the open_clip scorers (HPSv2, OpenCLIPScore)."""

from __future__ import annotations

from typing import Any


def import_open_clip(scorer: str) -> Any:
    """The ``open_clip`` module; a missing install names the extra that brings it."""
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            f"{scorer} needs open_clip; install the extra: pip install 'lightning-refdpo[hpsv2]' "
            "(package open_clip_torch)"
        ) from err
    return open_clip
