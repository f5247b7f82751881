"""Loading reward-model weights by hub id or local path; a failure names the scorer argument that fixes it."""

from __future__ import annotations

from typing import Any

from huggingface_hub import hf_hub_download

from lightning_refdpo.hub import ModelLoadError, load_component

_ONLINE_ONCE = "or run once online to fill the Hugging Face cache"


def from_pretrained(cls: Any, name_or_path: str, *, what: str, argument: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(name_or_path, **kwargs)`` through :func:`~lightning_refdpo.hub.load_component`.

    Raises :class:`~lightning_refdpo.hub.ModelLoadError` (an ``OSError``) naming ``argument``.
    """
    try:
        return load_component(cls, name_or_path, **kwargs)
    except ModelLoadError as err:
        raise ModelLoadError(
            f"could not load {what} {name_or_path!r} (offline or missing); "
            f"pass {argument}=<local folder> holding its saved files, {_ONLINE_ONCE}"
        ) from err


def hub_file(repo_id: str, filename: str, *, what: str, argument: str) -> str:
    """Local path of ``filename`` from hub repo ``repo_id``, fetched or cached by ``hf_hub_download``.

    Raises :class:`~lightning_refdpo.hub.ModelLoadError` (an ``OSError``) naming ``argument``.
    """
    try:
        return hf_hub_download(repo_id, filename)
    except OSError as err:
        raise ModelLoadError(
            f"could not fetch {what} {filename!r} from {repo_id!r} (offline or missing); "
            f"pass {argument}=<local file>, {_ONLINE_ONCE}"
        ) from err
