"""Training logs: the TensorBoard event writer (CRC-32C, TFRecord framing, Event encoding, restarts) read back by an
independent decoder (tests/tb_reader.py: protobuf's own parser) and, where installed, by TensorBoard; the loss-curve
PNG. The trainer's use of both (a killed and resumed run) is checked in test_train.py's resume test."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from pickstyle_jax.train import plot, tensorboard
from tests import tb_reader


def test_crc32c_matches_known_vectors_and_a_bitwise_reference(seed):
    # RFC 3720 (iSCSI) B.4 vectors and the usual check value
    assert tensorboard.crc32c(b"123456789") == 0xE3069283
    assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA
    assert tensorboard.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tensorboard.crc32c(bytes(range(32))) == 0x46DD794E
    assert tensorboard.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    rng = np.random.default_rng(seed)
    blobs = [rng.bytes(int(n)) for n in rng.integers(0, 300, 20)]
    for b in blobs:
        assert tensorboard.crc32c(b) == tb_reader.crc32c_bitwise(b)
    for name in ("crc32c", "google_crc32c"):  # a C implementation, where one is installed
        if importlib.util.find_spec(name):
            mod = __import__(name)
            fn = getattr(mod, "crc32c", None) or getattr(mod, "value")
            for b in blobs:
                assert tensorboard.crc32c(b) == fn(b)


def _write(tmp_path, seed):
    rng = np.random.default_rng(seed)
    steps = [1, 2, 3, 5, 130, 2**40]  # multi-byte varints
    want = {s: {"loss": float(rng.normal()), "grad_norm": float(rng.uniform(0, 10)), "lr": 5.6e-4,
                "mfu": 0.0} for s in steps}
    with tensorboard.EventWriter(tmp_path) as w:
        for s in steps:
            w.scalars(s, want[s], wall_time=1.7e9 + s / 7)
    return w.path, want


def test_events_read_back_with_protobuf(tmp_path, seed):
    path, want = _write(tmp_path, seed)
    evs = tb_reader.events(path)  # every CRC checked, bytes equal protobuf's own serialisation
    assert evs[0].file_version == "brain.Event:2" and evs[0].wall_time > 1e9
    assert [e.step for e in evs[1:]] == list(want)
    for e in evs[1:]:
        assert e.wall_time == 1.7e9 + e.step / 7
        got = {v.tag: v.simple_value for v in e.summary.value}
        assert got == {k: float(np.float32(v)) for k, v in want[e.step].items()}

    # A restart: a new file per run start; its START event at resume_step + 1 drops what the killed run logged
    # after its checkpoint (steps 5 .. 2**40 here), and nothing is lost from the first file.
    first = path.read_bytes()
    with tensorboard.EventWriter(tmp_path, resume_step=4) as w:
        w.scalars(5, {"loss": 0.25})
        w.scalars(6, {"loss": 0.125})
    assert path.read_bytes() == first and len(tb_reader.event_files(tmp_path)) == 2 and w.path != path
    loss = tb_reader.scalars(tmp_path)["loss"]
    assert loss == {**{s: float(np.float32(want[s]["loss"])) for s in (1, 2, 3)}, 5: 0.25, 6: 0.125}


def test_events_read_back_with_tensorboard(tmp_path, seed):
    pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from tensorboard.backend.event_processing import event_accumulator

    _, want = _write(tmp_path, seed)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert got == {s: float(np.float32(v["loss"])) for s, v in want.items()}


def test_loss_png_draws_the_curve_where_the_data_is(tmp_path, seed):
    import imageio.v3 as iio

    rng = np.random.default_rng(seed)
    steps = np.arange(10, 410, 10)
    losses = np.where(steps <= 200, 1.0, 0.2) + 0.02 * rng.standard_normal(len(steps))
    out = plot.write_loss_png(tmp_path / "loss.png", steps, losses, width=640, height=320)
    img = iio.imread(out)
    assert img.shape == (320, 640, 3) and img.dtype == np.uint8
    fr = plot.frame(steps, losses, 640, 320)
    assert 0 < fr.left < fr.right < 640 and 0 < fr.top < fr.bottom < 320
    cols, rows = fr.col(steps), fr.row(losses)
    # the first half's dots lie in the upper part of the plot, the second half's in the lower part
    assert rows[steps <= 200].max() < (fr.top + fr.bottom) / 2 < rows[steps > 200].min()
    is_raw, is_line = (np.all(img == plot.RAW, -1), np.all(img == plot.LINE, -1))
    # each logged point is a dot at its place (unless the smoothed line crosses it there)
    assert np.mean([is_raw[r:r + 2, c:c + 2].any() or is_line[r:r + 2, c:c + 2].any()
                    for r, c in zip(rows, cols)]) == 1.0
    # the smoothed line passes through every column of the data's span, at the smoothed loss
    sm = fr.row(plot.smooth(losses))
    for c, r in zip(cols, sm):
        assert is_line[r - 1:r + 3, c].any()
    assert not is_line[:, :fr.left].any() and not is_line[:, fr.right + 2:].any()
    # the axes and some tick labels are drawn in black left of and below the plot
    black = np.all(img == plot.AXES, -1)
    axis = fr.left - plot.GAP
    assert black[fr.top:fr.bottom, axis].all() and black[fr.bottom, axis:fr.right].all()
    assert black[fr.top:fr.bottom, :axis - 2].sum() > 50 and black[fr.bottom + 6:, fr.left:].sum() > 50
    with pytest.raises(ValueError, match="NaN"):
        plot.render(steps, np.where(steps == 50, np.nan, losses))
    assert plot.render([7], [0.25]).shape == (400, 800, 3)  # one point draws too


def test_analytic_flops_agree_with_xla_and_the_peak_table():
    """flops.forward_flops against XLA's cost analysis of an unrolled forward with plain XLA attention (no loops for
    the analysis to undercount): XLA also counts the elementwise work and the time MLP, a few % at this size."""
    import jax
    import jax.numpy as jnp

    from pickstyle_jax import flops
    from pickstyle_jax.models import wan

    cfg = wan.WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, vace_layers=(0,), text_dim=64, text_len=32)
    opts = wan.Options(attention="xla", scan_layers=False, fold_text_padding=False)
    f, h, w = 2, 8, 8
    args = (jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), wan.param_shapes(cfg)),
            jax.ShapeDtypeStruct((1, f, h, w, cfg.in_dim), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, cfg.text_len, cfg.text_dim), jnp.float32),
            jax.ShapeDtypeStruct((1, f, h, w, cfg.vace_in_dim), jnp.float32))
    compiled = jax.jit(lambda *a: wan.forward(cfg, *a, options=opts)).lower(*args).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    ours = flops.forward_flops(cfg, f * (h // 2) * (w // 2))
    print(f"XLA {xla:.4g} FLOPs, analytic {ours:.4g}, ratio {xla / ours:.4f}")
    assert 1.0 <= xla / ours <= 1.08
    assert flops.train_step_flops(cfg, 32, 3) == 3 * (2 * ours + flops.attention_core_flops(cfg, 32))

    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops("NVIDIA H200") == 989e12 and flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("TPU v5 lite") == 197e12 and flops.peak_flops("TPU v5") == 459e12
    assert flops.peak_flops("TPU v6 lite") == 918e12 and flops.peak_flops("TPU v4") == 275e12
    assert flops.peak_flops("cpu") is None
