"""Opening a module checkpoint safely, what it carries besides weights, and how keys of older
checkpoints map to now."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

UNSAFE_UNPICKLE_HELP = (
    "unpickle the whole checkpoint (torch.load weights_only=False), which RUNS ANY CODE the file "
    "holds: only for a file you trust that holds more than tensors and plain values"
)


class CheckpointError(ValueError):
    """A checkpoint refused before anything in it is used: it holds an object that loading would
    import and call, or it names a module class that cannot be imported. One line naming the file
    and the fix."""


def load_checkpoint(path: str | Path, unsafe_unpickle: bool = False) -> dict[str, Any]:
    """The contents of the Lightning checkpoint ``path``, memory-mapped on CPU (cheap even for full
    fine-tuning checkpoints).

    Loaded with ``torch.load(weights_only=True)``: tensors, dtypes, sizes, numbers, strings, ``None``
    and lists, tuples, sets, dicts and ``OrderedDict``s of them, nothing that imports or calls code.
    That is everything a checkpoint of ``lightning-refdpo fit`` holds (weights, optimizer and LR
    scheduler states, hyperparameters, loop, callback and RNG states), in this version and in 0.1,
    so no other type is allow-listed. Any other object (a class instance, a function such as
    ``os.system`` that its ``__reduce__`` would call) is refused with :class:`CheckpointError`
    naming it. ``unsafe_unpickle=True`` unpickles the whole file (``weights_only=False``), running
    whatever code it holds: only for a file you trust, e.g. of a subclass whose hyperparameters
    hold its own types. A file that is not a checkpoint raises torch's error (``RuntimeError``).
    """
    try:
        return torch.load(str(path), map_location="cpu", mmap=True, weights_only=not unsafe_unpickle)
    except pickle.UnpicklingError as err:
        if unsafe_unpickle:
            raise
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "an object other than tensors and plain values"
        raise CheckpointError(
            f"checkpoint {path} holds {what}, which loading it would import and may run as code: refused. "
            "Only if you trust the file, load it with --unsafe_unpickle true (Python: unsafe_unpickle=True)"
        ) from None


LEGACY_KEY_PREFIXES = {"unet.": "policy.", "reference_unet.": "reference.model."}
"""State-dict prefixes of checkpoints written before the backbone / reference-strategy layout
(version 0.1), and their names now."""


def current_key(key: str) -> str:
    """A state-dict key of a checkpoint written before the backbone layout, under its name now."""
    for old, new in LEGACY_KEY_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def torch_rng_states() -> dict[str, Any]:
    """The global torch CPU and CUDA generator states, as tensors (a checkpoint that Lightning's
    ``weights_only`` loading accepts). The data draws no global randomness (``data/draws.py``);
    these cover what the model draws from it, e.g. LoRA dropout."""
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_torch_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["torch.cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
