"""Smoke test of ``benchmarks/memory.py``: one configuration counted at SD1.5 and SDXL size on the
meta device, and its measured training step run on the tiny models (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
CONFIGURATION = "full, AdamW8bit, frozen bf16, initial offloaded"


def test_memory_benchmark_counts_and_measures_a_step(tmp_path):
    output = tmp_path / "memory.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--measure-step", "--tiny", "--configurations", CONFIGURATION]
        + ["--checkpointing", "on", "--output", str(output)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    results = json.loads(output.read_text())
    for family, parameters in (("sd15", 859_520_964), ("sdxl", 2_567_463_684)):
        assert results["families"][family]["unet_parameters"] == parameters
        figures = results["families"][family]["bytes"][CONFIGURATION]
        assert figures["trained_parameters"] == figures["gradients"] == 4 * parameters
        assert figures["frozen_weights"] == figures["offloaded_to_cpu"] == 2 * parameters  # bf16 reference
        assert 2 * parameters < figures["optimizer_state"] < 2.1 * parameters  # two 8-bit moments
        assert figures["on_device_ddp_buckets"] == figures["on_device"] + figures["gradients"]
        peak = results["measured_step_peak_bytes"][family][f"{CONFIGURATION}, checkpointing on"]
        assert peak > 0
