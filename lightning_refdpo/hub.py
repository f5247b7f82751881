"""Loading pipeline components by hub id or local folder, with one clear line when it fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ModelLoadError(OSError):
    """A model id or folder that could not be loaded (offline, misspelt, or missing a subfolder)."""


class MissingExtraError(ImportError):
    """An optional dependency that is not installed; the message names the extra that brings it."""


def load_component(cls: Any, name_or_path: str, subfolder: str | None = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)``, as users call it.

    ``None`` values in ``kwargs`` are dropped so each class keeps its own defaults. Failures raise
    :class:`ModelLoadError` naming the id, the subfolder and the usual fixes.
    """
    kwargs = {k: v for k, v in {**kwargs, "subfolder": subfolder}.items() if v is not None}
    where = f"{name_or_path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        component = cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load {cls.__name__} from {where}: {str(err).splitlines()[0]} {_FIX}"
        ) from None
    # transformers builds a tokenizer of special tokens only when its vocabulary files are missing.
    if hasattr(component, "all_special_tokens") and len(component) <= len(set(component.all_special_tokens)):
        raise ModelLoadError(f"could not load {cls.__name__} from {where}: no vocabulary files found. {_FIX}")
    return component


_FIX = (
    "Check the id or path; without network access, download it first or point to a local folder "
    "(HF_HUB_OFFLINE=1 uses the local cache only)."
)


def absolute_if_local(name_or_path: str | None) -> str | None:
    """``name_or_path`` as an absolute path when it names an existing local folder, else unchanged
    (a hub id)."""
    if name_or_path is None or not Path(name_or_path).expanduser().is_dir():
        return name_or_path
    return str(Path(name_or_path).expanduser().resolve())
