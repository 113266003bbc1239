"""The production evaluate CLI (`python -m pickstyle_jax.evaluate --source IN --stylized OUT`, eval/cli.py) on a real
mp4 pair: its numbers are the metric functions' on the decoded frames, bad input is one line and exit 2, the old
`--workdir` form names the demo's benchmark. (tests/test_imports.py checks that no production module reaches
pickstyle_jax/demo/.)"""
import json
import subprocess
import sys

import numpy as np
import pytest

from pickstyle_jax import evaluate, video
from pickstyle_jax.errors import TRACEBACK_ENV, InputError
from pickstyle_jax.eval import cli, metrics

F, H, W = 9, 32, 48


def _clips(rng):
    """A square moving over a still gradient, and a 'stylisation': posterised colours, a little per-frame noise."""
    yy, xx = np.mgrid[0:H, 0:W]
    bg = np.stack([4 * xx, 6 * yy, np.full_like(xx, 120)], -1).astype(np.float64)
    src = np.repeat(bg[None], F, axis=0)
    for t in range(F):
        src[t, 8:20, 2 + 3 * t:14 + 3 * t] = (230, 40, 40)
    src = src.astype(np.uint8)
    out = (np.round(src / 64.0) * 64.0 + rng.normal(0, 6, src.shape)).clip(0, 255).astype(np.uint8)
    return src, out


@pytest.fixture
def pair(tmp_path, seed):
    src, out = _clips(np.random.default_rng(seed))
    return video.write(tmp_path / "in.mp4", src, fps=8), video.write(tmp_path / "out.mp4", out, fps=8)


def test_scores_are_the_metric_functions_on_the_files(pair, tmp_path, capsys):
    src_path, out_path = pair
    assert evaluate.main is cli.main  # the permanent entry module runs the eval CLI
    scores = tmp_path / "scores" / "s.json"
    assert cli.main(["--source", str(src_path), "--stylized", str(out_path), "--out", str(scores)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(scores.read_text())
    src, _ = video.read(src_path)
    out, _ = video.read(out_path)
    flow, valid = metrics.source_motion(src)
    want = {"temporal_error": metrics.temporal_error(out, flow, valid), "flicker": metrics.flicker(out, src),
            "content": metrics.content(out, src)}
    assert record["metrics"] == want  # exactly: the same functions on the same decoded frames
    assert (record["frames"], record["height"], record["width"]) == (F, H, W)
    assert 0.5 < record["valid_fraction"] < 1  # the background is still, the square is not
    assert record["valid_fraction"] == pytest.approx(float(valid.mean()))
    for k, v in want.items():
        assert f"| {k} | {v:.4f} |" in printed
    # the source scored against itself: no flicker, full content, at most codec noise where its motion holds
    self_scores = cli.score(src, src)
    assert self_scores["flicker"] == 0.0 and self_scores["content"] == 1.0
    assert self_scores["temporal_error"] <= metrics.STILL_TOL
    assert want["flicker"] > 0 and want["temporal_error"] > 0 and want["content"] < 1


def _one_error_line(code, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert "Traceback" not in err
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(pair, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    src_path, out_path = pair

    def fails(argv, *needles):
        code = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        assert captured.out == ""
        _one_error_line(code, captured.err, *needles)

    missing = tmp_path / "missing.mp4"
    fails(["--source", missing, "--stylized", out_path], "--source", missing, "does not exist")
    fails(["--source", src_path, "--stylized", missing], "--stylized", missing, "does not exist")
    src, out = _clips(np.random.default_rng(0))
    short = video.write(tmp_path / "short.mp4", out[:5], fps=8)
    fails(["--source", src_path, "--stylized", short], "5 frames", f"has {F}", "--max-frames")
    small = video.write(tmp_path / "small.mp4", out[:, :16, :24], fps=8)
    fails(["--source", src_path, "--stylized", small], "16x24", f"{H}x{W}", "resize", "--size")
    fails(["--source", src_path], "--stylized")
    fails(["--source", src_path, "--stylized", out_path, "--out", tmp_path / "s.txt"], "s.txt", "JSON")
    fails(["--workdir", tmp_path / "run"], "python -m pickstyle_jax.demo.evaluate --workdir", tmp_path / "run")
    assert not (tmp_path / "s.txt").exists()
    with pytest.raises(InputError, match="does not exist"):  # a traceback on request
        cli.main(["--source", str(missing), "--stylized", str(out_path), "--verbose"])


def test_the_old_workdir_form_imports_no_demo_code(tmp_path):
    code = ("import sys; from pickstyle_jax.eval import cli; c = cli.main(['--workdir', 'run']); "
            "print(c, [m for m in sys.modules if m.startswith('pickstyle_jax.demo')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "2 []", (r.stdout, r.stderr)
    assert "python -m pickstyle_jax.demo.evaluate --workdir run" in r.stderr

