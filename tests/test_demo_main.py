"""`python -m pickstyle_jax.demo` end to end on `configs/demo.py:tiny`: pretraining, the LoRA stage and the
evaluation run through the driver itself (the stages are tested alone elsewhere; this catches the wiring), and a
second run resumes everything instead of redoing it."""
import json
import pathlib

from pickstyle_jax.demo import __main__ as demo_main

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def test_the_driver_runs_every_stage_and_resumes(tmp_path, capsys):
    argv = ["--workdir", str(tmp_path), "--config", f"{CONFIG}:tiny", "--clips", "1", "--seeds", "0,1"]
    assert demo_main.main(argv) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows][:3] == ["cs_cfg", "text_cfg", "no_guidance"]
    assert "stage times: pretrain" in out and "| cs_cfg" in out
    assert (tmp_path / "lora" / "config.json").is_file() and (tmp_path / "metrics.jsonl").is_file()
    assert demo_main.main(argv + ["--no-eval"]) == 0  # a rerun finds the base models and the LoRA done
    assert "LoRA already trained" in capsys.readouterr().out
