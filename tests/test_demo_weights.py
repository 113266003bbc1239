"""The demo's shipped base models (pickstyle_jax/demo/weights, demo/shipped.py): they match their checksum manifest,
were made from configs/demo.py's current pretraining settings (so `make demo` loads them instead of refitting for
hours), fit the repository's size budget, load, and reproduce the one-step prediction error recorded when they were
shipped. A damaged copy is refused with every bad file named."""
import importlib.util
import pathlib
import shutil

import pytest

from pickstyle_jax import checkpoints
from pickstyle_jax.demo import pretrain, shipped

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def _config():
    spec = importlib.util.spec_from_file_location("demo_config", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(None)


def test_shipped_weights_verify_match_the_config_and_reproduce_their_recorded_error():
    manifest = shipped.verify()
    config = _config()
    assert shipped.available(config), (
        "configs/demo.py's pretrain settings no longer match the shipped weights' fingerprint: make demo would refit "
        "them for hours; run make demo-pretrain and commit pickstyle_jax/demo/weights")
    assert manifest["bytes"] <= shipped.MAX_BYTES
    assert sum(p.stat().st_size for p in shipped.WEIGHTS.rglob("*") if p.is_file()) <= shipped.MAX_BYTES
    for k in shipped.PARTS:
        meta = checkpoints.read_meta(shipped.WEIGHTS / k)
        assert meta["pretrain"]["fingerprint"] == pretrain.fingerprint(config)
    got = shipped.one_step_error(config, shipped.WEIGHTS, seed=manifest["one_step_error"]["seed"])
    want = manifest["one_step_error"]["value"]
    print(f"one-step error {got:.8g}, recorded {want:.8g}")
    assert got == pytest.approx(want, rel=1e-4)  # fp32 on another CPU: reduction order may differ in the last bits


def test_a_damaged_copy_is_refused_naming_every_bad_file(tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(shipped.WEIGHTS, root)
    listed = sorted(shipped.verify(root)["files"])
    changed, missing = root / listed[0], root / listed[1]
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    missing.unlink()
    (root / "dit" / "stray.bin").write_bytes(b"x")
    with pytest.raises(shipped.WeightsError) as e:
        shipped.verify(root)
    msg = str(e.value)
    assert listed[0] in msg and listed[1] in msg and "dit/stray.bin" in msg and "make demo-pretrain" in msg
    (root / shipped.MANIFEST).unlink()
    with pytest.raises(shipped.WeightsError, match="MANIFEST.json is missing"):
        shipped.verify(root)
