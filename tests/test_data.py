"""Sources (folder v1/v2, TFDS, synthetic), the resize, and the Grain pipeline: equality across sources, exact
resume, host sharding, worker-count independence and bad-input errors. Fresh random images every run; the seed is
printed."""
import importlib.util
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pickstyle_jax import data
from pickstyle_jax.data import motion, pipeline, sources, synthetic, tfds_pairs
from pickstyle_jax.train import config as train_config

tfds_pairs.tfds.disable_progress_bar()
SEED = int(np.random.SeedSequence().entropy % 2**31)
print(f"test_data seed: {SEED}")
SIZES = [(40, 60), (44, 60), (48, 80), (40, 66)]  # all >= the 32 x 48 test crop, mixed aspect ratios


def small_config(**kw):
    c = train_config.data_config()
    c.frames, c.height, c.width = 5, 32, 48
    c.batch_size, c.num_epochs, c.shift_range, c.prefetch = 2, 1, (5, 15), 0
    c.update(kw)
    return c


def write_png(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def rng(request):
    print(f"seed {SEED} (test {request.node.name})")  # shown with a failure's captured output
    return np.random.default_rng([SEED, sum(map(ord, request.node.name))])


@pytest.fixture
def layouts(tmp_path, rng):
    """The same pairs written as a v1 layout (styles anime, clay) and a v2 layout (Anime, Clay_Toy); returns
    (v1 root, v2 root, {(style, i): (source, target, description)})."""
    n = 4
    srcs = [rng.integers(0, 256, SIZES[i] + (3,), dtype=np.uint8) for i in range(n)]
    truth, captions = {}, {}
    for i, s in enumerate(srcs):
        write_png(tmp_path / f"v1/unity/{i:04d}.png", s)
        captions[f"{i:04d}.png"] = "" if i == 2 else f"scene number {i}"
    (tmp_path / "v1/caption.json").write_text(json.dumps(captions))
    for style, v2name in [("anime", "Anime"), ("clay", "Clay_Toy")]:
        for i, s in enumerate(srcs):
            tgt = rng.integers(0, 256, SIZES[(i + 1) % n] + (4,), dtype=np.uint8)  # RGBA: alpha must be dropped
            write_png(tmp_path / f"v1/{style}/{i:04d}.png", tgt)
            write_png(tmp_path / f"v2/{v2name}/src/{i:04d}.png", s)
            write_png(tmp_path / f"v2/{v2name}/tar/{i:04d}.png", tgt)
            desc = captions[f"{i:04d}.png"]
            cap = f"{style} style." + (f" {desc}" if desc else "")
            (tmp_path / f"v2/{v2name}/caption").mkdir(parents=True, exist_ok=True)
            (tmp_path / f"v2/{v2name}/caption/{i:04d}.txt").write_text(f"  {cap}\n")
            truth[(style, i)] = (s, tgt[..., :3], cap)
    return tmp_path / "v1", tmp_path / "v2", truth


def assert_same_examples(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for k in ("source", "target"):
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{k} of example {i}")
        assert (x["caption"], x["style"]) == (y["caption"], y["style"]), i


def test_folder_layouts_and_tfds_give_the_same_examples(layouts, tmp_path):
    v1_root, v2_root, truth = layouts
    v1 = sources.FolderV1(v1_root, ["anime", "clay"])
    v2 = sources.FolderV2(v2_root, ["Anime", "Clay_Toy"])
    assert len(v1) == len(v2) == 8
    for i in range(8):
        ex = v1[i]
        s, t, cap = truth[("anime" if i < 4 else "clay", i % 4)]
        np.testing.assert_array_equal(ex["source"], s)
        np.testing.assert_array_equal(ex["target"], t)
        assert ex["caption"] == cap and ex["target"].shape[-1] == 3
    assert v1[2]["caption"] == "anime style." and v1[1]["caption"] == "anime style. scene number 1"
    assert [v2[i]["style"] for i in (0, 4)] == ["anime", "clay"]  # "Clay_Toy" -> "clay"
    assert_same_examples(v1, v2)
    for layout, root, folder in [("v1", v1_root, v1), ("v2", v2_root, v2)]:
        tfds_pairs.build(root, layout, tmp_path / "tfds")
        assert_same_examples(folder, tfds_pairs.TfdsPairs(tmp_path / "tfds", layout, ["anime", "clay"]))
    assert_same_examples(sources.FolderV2(v2_root), tfds_pairs.TfdsPairs(tmp_path / "tfds", "v2"))  # default order
    clay = tfds_pairs.TfdsPairs(tmp_path / "tfds", "v2", ["Clay_Toy"])
    assert len(clay) == 4 and clay[0]["style"] == "clay"
    # TFDS in its TF-free mode: TensorFlow is not installed and was never imported.
    assert importlib.util.find_spec("tensorflow") is None and "tensorflow" not in sys.modules


def test_pipeline_same_batches_from_folder_and_tfds(layouts, tmp_path):
    _, v2_root, _ = layouts
    tfds_pairs.build(v2_root, "v2", tmp_path / "tfds")
    a = list(data.make_iterator(small_config(source="folder_v2", root=str(v2_root)), seed=SEED % 1000))
    b = list(data.make_iterator(small_config(source="tfds", root=str(tmp_path / "tfds")), seed=SEED % 1000))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["source"].shape == (2, 5, 32, 48, 3) and x["source"].dtype == np.uint8
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_mixed_layouts_in_one_run(layouts, tmp_path):
    v1_root, v2_root, truth = layouts
    c = small_config(source="folder_v1+folder_v2", root=f"{v1_root}{os.pathsep}{v2_root}", styles=("anime", "Clay_Toy"))
    mixed = data.make_source(c)
    assert len(mixed) == 8 and [mixed[i]["id"] for i in (0, 4)] == ["v1/anime/0000", "v2/Clay_Toy/0000"]
    np.testing.assert_array_equal(mixed[5]["target"], truth[("clay", 1)][1])
    for layout, root in [("v1", v1_root), ("v2", v2_root)]:
        tfds_pairs.build(root, layout, tmp_path / "tfds")
    both = data.make_source(small_config(source="tfds", tfds_layout="v1+v2", root=str(tmp_path / "tfds"),
                                         styles=("clay",)))
    assert len(both) == 8 and {both[i]["id"].split("/")[0] for i in range(8)} == {"v1", "v2"}
    with pytest.raises(sources.DataError, match="pixar"):
        data.make_source(small_config(source="folder_v1+folder_v2", root=f"{v1_root}{os.pathsep}{v2_root}",
                                      styles=("anime", "pixar")))
    assert len(list(data.make_iterator(c, seed=0))) == 4


def test_batch_is_the_pair_rendered_with_one_draw(layouts):
    _, v2_root, _ = layouts
    c = small_config(source="folder_v2", root=str(v2_root), move_prob=1.0, batch_size=1, shuffle=False)
    src = data.make_source(c)
    make = pipeline.MakeClip(src, c, seed=7, epoch_length=len(src))
    for i, batch in enumerate(data.make_iterator(c, seed=7)):
        ex = src[i]
        pair = [data.fit(ex[k], 32, 48) for k in ("source", "target")]
        p = make.params(i, i)
        np.testing.assert_array_equal(batch["source"][0], motion.render_uint8(pair[0], p, 5))
        np.testing.assert_array_equal(batch["target"][0], motion.render_uint8(pair[1], p, 5))
        assert batch["caption"][0] == ex["caption"]
    same = pipeline.MakeClip(IdenticalPairs(), c, seed=0, epoch_length=4)
    for i in range(4):  # identical pair in -> identical clips out
        out = same(i, i)
        np.testing.assert_array_equal(out["source"], out["target"])


class IdenticalPairs(synthetic.Synthetic):
    def __getitem__(self, index):
        ex = super().__getitem__(index)
        return {**ex, "target": ex["source"]}


def test_checkpoint_restore_mid_epoch_continues_with_the_next_batch(tmp_path):
    import orbax.checkpoint as ocp

    c = small_config(synthetic_examples=12, batch_size=3, num_epochs=2, prefetch=2)
    ref = list(data.make_iterator(c, seed=SEED % 1000))
    assert len(ref) == 8  # 24 examples over two epochs, batches straddle the epoch boundary
    it = data.make_iterator(c, seed=SEED % 1000)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    mgr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                                item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    it.close()
    for restore in ("set_state", "orbax"):
        it2 = data.make_iterator(c, seed=SEED % 1000)
        if restore == "set_state":
            it2.set_state(state)
        else:
            mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
        rest = list(it2)
        assert len(rest) == 5, restore
        for x, y in zip(rest, ref[3:]):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=restore)
        it2.close()


def test_two_workers_match_in_process_and_restore():
    c = small_config(synthetic_examples=8, batch_size=2, num_epochs=1)
    ref = list(data.make_iterator(c, seed=3))
    it = data.make_iterator(small_config(synthetic_examples=8, batch_size=2, num_epochs=1, num_workers=2), seed=3)
    try:
        first = next(it)
        state = it.get_state()
        second = next(it)
    finally:
        it.close()
    it2 = data.make_iterator(small_config(synthetic_examples=8, batch_size=2, num_epochs=1, num_workers=2), seed=3)
    try:
        it2.set_state(state)
        restored = next(it2)
    finally:
        it2.close()
    for got, want in [(first, ref[0]), (second, ref[1]), (restored, ref[1])]:
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("n", [12, 13])
def test_two_processes_see_disjoint_halves(n):
    seen = []
    for index in (0, 1):
        c = small_config(synthetic_examples=n, batch_size=4, process_index=index, process_count=2, frames=2)
        batches = list(data.make_iterator(c, seed=1))
        assert all(b["source"].shape[0] == 2 for b in batches)  # per-host batch = global 4 / 2 processes
        seen.append([i for b in batches for i in b["id"]])
    a, b = set(seen[0]), set(seen[1])
    assert len(seen[0]) == len(a) == len(seen[1]) == n // 2 and not a & b
    assert len(a | b) == n - n % 2  # everything, less the remainder dropped so all hosts take equal steps


def test_fit_matches_torch_bicubic_antialias(rng):
    for h, w in [(70, 90), (33, 49), (120, 60), (32, 48)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = data.fit(img, 32, 48)
        s = max(48 / w, 32 / h)
        nh, nw = round(s * h), round(s * w)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        ref = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (nh - 32) // 2, (nw - 48) // 2
        ref = ref.permute(1, 2, 0).numpy()[top:top + 32, left:left + 48]
        # PIL's float32 bicubic is the kernel torch's antialias path was written to match; the difference is
        # accumulation order, ~1e-3 of a grey level (well under 1e-4 in [-1, 1] units at these sizes).
        np.testing.assert_allclose(got, ref, rtol=0, atol=0.02, err_msg=f"{h}x{w}")


def test_synthetic_source():
    a, b = synthetic.Synthetic(8, 40, 56, seed=5), synthetic.Synthetic(8, 40, 56, seed=5)
    for i in range(8):
        x, y = a[i], b[i]
        np.testing.assert_array_equal(x["source"], y["source"])
        assert x["source"].shape == x["target"].shape == (40, 56, 3) and x["source"].dtype == np.uint8
        assert x["style"] == synthetic.SYNTHETIC_STYLES[i % 4]
        assert x["caption"].startswith(f"{x['style'].capitalize()} style. A") and x["caption"].endswith("gradient.")
        assert not np.array_equal(x["source"], x["target"])
    assert not np.array_equal(a[0]["source"], synthetic.Synthetic(8, 40, 56, seed=6)[0]["source"])


def test_bad_inputs_name_the_file(layouts, tmp_path):
    v1_root, v2_root, _ = layouts
    clay = v2_root / "Clay_Toy"
    os.remove(clay / "tar/0002.png")  # a missing image: counts differ
    with pytest.raises(sources.DataError, match=r"Clay_Toy/src.*Clay_Toy/tar.*0002"):
        sources.FolderV2(v2_root)
    write_png(clay / "tar/0002b.png", np.zeros((40, 60, 3), np.uint8))  # same count, wrong name
    with pytest.raises(sources.DataError, match=r"src/0002.png is paired with .*tar/0002b.png"):
        sources.FolderV2(v2_root)
    assert len(sources.FolderV2(v2_root, strict_names=False)) == 8  # official: sorted index only
    os.rename(clay / "tar/0002b.png", clay / "tar/0002.png")
    (clay / "caption/0003.txt").write_text("  \n")
    with pytest.raises(sources.DataError, match=r"empty caption .*Clay_Toy/caption/0003.txt"):
        sources.FolderV2(v2_root)
    os.remove(clay / "caption/0003.txt")  # a missing caption
    with pytest.raises(sources.DataError, match=r"caption.*0003"):
        sources.FolderV2(v2_root)
    captions = json.loads((v1_root / "caption.json").read_text())
    del captions["0001.png"]
    (v1_root / "caption.json").write_text(json.dumps(captions))
    with pytest.raises(sources.DataError, match=r"no caption for .*unity/0001.png"):
        sources.FolderV1(v1_root)
    assert len(sources.FolderV1(v1_root, on_error="skip")) == 6

    (v2_root / "Anime/tar/0001.png").write_bytes(b"not a png")  # unreadable
    with pytest.raises(sources.DataError, match=r"cannot read image .*Anime/tar/0001.png"):
        sources.FolderV2(v2_root, ["Anime"])
    skipping = sources.FolderV2(v2_root, ["Anime"], on_error="skip")
    assert len(skipping) == 3 and len(skipping.skipped) == 1 and "Anime/tar/0001.png" in skipping.skipped[0][1]

    write_png(v2_root / "Anime/src/0000.png", np.zeros((31, 60, 3), np.uint8))  # smaller than the 32 x 48 crop
    with pytest.raises(sources.DataError, match=r"Anime/src/0000.png is 31x60, smaller than the 32x48 crop"):
        data.make_source(small_config(source="folder_v2", root=str(v2_root), styles=("Anime",), on_error="raise"))
    small = sources.FolderV2(v2_root, ["Anime"], min_size=(32, 48), on_error="skip")  # counted, not silent
    assert len(small) == 2 and [why for _, why in small.skipped if "0000.png is 31x60" in why]
    up = small_config(source="folder_v2", root=str(v2_root), styles=("Anime",), allow_upscale=True,
                      on_error="skip", batch_size=1)
    assert len(list(data.make_iterator(up, seed=0))) == 3

    good = (v2_root / "Anime/src/0002.png").read_bytes()
    (v2_root / "Anime/src/0002.png").write_bytes(good[:len(good) // 2])  # header fine, data truncated
    src = sources.FolderV2(v2_root, ["Anime"], on_error="skip")  # (0001 dropped at construction)
    with pytest.raises(sources.DataError, match=r"cannot read image .*Anime/src/0002.png"):
        src[1]
    skip = small_config(source="folder_v2", root=str(v2_root), styles=("Anime",), allow_upscale=True,
                        on_error="skip", batch_size=1, shuffle=False)
    assert [b["id"][0] for b in data.make_iterator(skip, seed=0)] == ["v2/Anime/0000", "v2/Anime/0003"]
    write_png(v2_root / "Anime/tar/0001.png", np.zeros((40, 60, 3), np.uint8))
    strict = small_config(source="folder_v2", root=str(v2_root), styles=("Anime",), allow_upscale=True,
                          batch_size=1, shuffle=False)
    with pytest.raises(sources.DataError, match=r"cannot read image .*Anime/src/0002.png"):
        list(data.make_iterator(strict, seed=0))


def test_data_imports_no_models_torch_or_tensorflow():
    code = ("import sys; import pickstyle_jax.data, pickstyle_jax.data.tfds_pairs; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow') "
            "or m.startswith('pickstyle_jax.models')]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
