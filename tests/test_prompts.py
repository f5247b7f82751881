"""Evaluation prompt sets: files, limits, unknown names."""

import json

import pytest

from lightning_refdpo.prompts import load_prompts


def test_prompt_files_and_unknown_names(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\na cat\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "x"}, "y", {"caption": "z"}]))
    assert load_prompts(str(tmp_path / "p.json"), limit=2) == ["x", "y"]
    with pytest.raises(ValueError, match="pickapic_v2_test, partiprompts, hpdv2"):
        load_prompts("drawbench")
