"""``lightning-refdpo evaluate`` on a trained checkpoint: results.json and the Markdown table."""

import json
import sys

import lightning_refdpo.metrics
from lightning_refdpo.cli import main, run_cli
from lightning_refdpo.evaluation import results_table
from tests.helpers import Brightness

PROMPTS = ["a red cat", "a blue dog"]


def test_evaluate_command_writes_json_and_table(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    cli = run_cli(
        [
            "fit",
            "--config=configs/tiny.yaml",
            f"--model.init_args.pretrained_model_name_or_path={tiny_model}",
            f"--data.init_args.data_files={json.dumps(tiny_data)}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=4",
        ]
    )
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    results = run_cli(
        [
            "evaluate",
            ckpt,
            "--scorers",
            '[{"class_path": "tests.helpers.Brightness"}]',
            f"--prompt_sets=[{tmp_path / 'prompts.txt'}]",
            "--seeds=[0, 1]",
            "--num_inference_steps=2",
            "--resolution=32",
            "--device=cpu",
            f"--output={tmp_path / 'eval'}",
        ]
    ).result
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    entry = written["prompt_sets"][str(tmp_path / "prompts.txt")]
    assert entry["num_images"] == 4 and set(entry["scores"]["Brightness"]) == {
        "model_mean",
        "model_ci",
        "baseline_mean",
        "baseline_ci",
        "win_rate",
        "win_rate_ci",
    }
    assert written == json.loads(json.dumps(results))
    table = (tmp_path / "eval" / "results.md").read_text()
    assert table == results_table(written) and "| win rate vs baseline |" in table

    # The paper's scorers by default: without open_clip, HPSv2 stops the command with one line.
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` raises ImportError
    monkeypatch.setattr(lightning_refdpo.metrics, "PickScore", Brightness)  # no hub download before HPSv2
    capsys.readouterr()
    assert main(["evaluate", ckpt, "--device=cpu", f"--output={tmp_path / 'paper'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.splitlines() == [
        "lightning-refdpo: error: HPSv2 needs open_clip; install the extra: "
        "pip install 'lightning-refdpo[hpsv2]' (package open_clip_torch)"
    ]
