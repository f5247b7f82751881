"""Smoke test of ``benchmarks/step_cost.py`` on the tiny preset: it runs and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"


def test_step_cost_benchmark_writes_results(tmp_path):
    output = tmp_path / "step_cost.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--output", str(output)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    results = json.loads(output.read_text())
    times = results["step_seconds_median"]
    assert set(times) == {"bare", "module", "module_uncached", "public_style"}
    assert all(t > 0 for t in times.values()), times
    assert all(n >= 2 for n in results["steps_counted"].values()), results["step_seconds"]
    assert results["ratio_module_vs_bare"] == times["module"] / times["bare"]
    assert results["ratio_uncached_vs_bare"] == times["module_uncached"] / times["bare"]
    assert results["speedup_vs_public_style"] == times["public_style"] / times["module"]
    memory = results["peak_memory_bytes"]
    assert memory["lora_ref"] > 0 and memory["lora_sft"] > 0
    assert results["memory_ratio_lora_ref_vs_sft"] == memory["lora_ref"] / memory["lora_sft"]
    events = results["reference_update_event"]
    assert events["tau"] == 32 and set(events["seconds_median"]) == {
        "hard_copy_accepted",
        "hard_copy_refused",
        "cpu_copy_accepted",
        "hard_copy_offloaded",
    }
    for kind, seconds in events["seconds_median"].items():
        assert seconds > 0
        assert events["amortized_share_of_step"][kind] == seconds / 32 / times["module"]
    assert set(events["peak_memory_bytes"]) == {
        "event_cpu_copy",
        "event_hard_copy",
        "event_cpu_copy_bf16",
        "event_hard_copy_bf16",
    }
    assert all(peak >= 0 for peak in events["peak_memory_bytes"].values())
