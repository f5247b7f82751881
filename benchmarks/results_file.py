"""What every benchmark records of the machine it ran on, and how it writes its results."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine(device: str) -> dict:
    """The device (the GPU's name, or ``cpu``), the CPU threads, torch and Python versions."""
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_results(results: dict, output: Path) -> None:
    """``results`` as indented JSON at ``output`` (its folder created)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {output}")
