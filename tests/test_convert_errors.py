"""Corrupt, truncated, wrong-kind and unreadable inputs to the model converters.

Each case must end in exactly one stderr line `error: <file>: <what is wrong>`, exit status 1, no traceback, and
nothing written at --dst (an existing checkpoint there is left as it was). The command lines run in-process
(`main([...])`, the same code `python -m convert.X` runs); one subprocess run checks the real entry point.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convert import umt5 as convert_umt5
from convert import wan_dit, wan_vae

CONVERTERS = {"wan_dit": wan_dit.main, "wan_vae": wan_vae.main, "umt5": convert_umt5.main}


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.norm1.weight": torch.randn(64, generator=g),
            "blocks.0.attn.q.weight": torch.randn(64, 64, generator=g)}


def _truncated(path: Path, write):
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_safetensors(d, seed):
    f = d / "model.safetensors"
    f.write_bytes(np.random.default_rng(seed).bytes(4096))
    return f, f, "not a valid safetensors file"


def _truncated_safetensors(d, seed):
    f = d / "model.safetensors"
    _truncated(f, lambda p: save_file(_tensors(seed), str(p)))
    return f, f, "truncated"


def _pth_not_a_pickle(d, seed):
    f = d / "model.pth"
    f.write_text("this is a text file, not a torch checkpoint\n" * 20)
    return f, f, "not a PyTorch checkpoint"


def _safetensors_named_pth(d, seed):
    f = d / "model.pth"
    save_file(_tensors(seed), str(f))
    return f, f, "not a PyTorch checkpoint"


def _zip_not_torch(d, seed):
    f = d / "model.pth"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("weights/readme.txt", "hello")
    return f, f, "not a PyTorch checkpoint (no data.pkl"


def _truncated_pth(d, seed):
    f = d / "model.pth"
    _truncated(f, lambda p: torch.save(_tensors(seed), p))
    return f, f, "truncated or corrupt"


def _truncated_legacy_pth(d, seed):
    f = d / "model.pth"
    _truncated(f, lambda p: torch.save(_tensors(seed), p, _use_new_zipfile_serialization=False))
    return f, f, "corrupt or truncated"


def _index_missing_shard(d, seed):
    save_file(_tensors(seed), str(d / "model-00001-of-00002.safetensors"))
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"blocks.0.norm1.weight": "model-00001-of-00002.safetensors",
                                                "blocks.0.attn.q.weight": "model-00002-of-00002.safetensors"}}))
    return d, index, "model-00002-of-00002.safetensors"


def _index_not_json(d, seed):
    index = d / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors",')  # cut off mid-write
    return d, index, "not valid JSON"


def _shard_unreadable(d, seed):
    (d / "model-00001-of-00001.safetensors").mkdir()  # exists, but open() fails (IsADirectoryError)
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    return d, d / "model-00001-of-00001.safetensors", "cannot read the file"


def _no_permission(d, seed):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode; the directory-as-shard case covers unreadable files")
    f = d / "model.safetensors"
    save_file(_tensors(seed), str(f))
    f.chmod(0)
    return f, f, "cannot read the file"


def _no_known_files(d, seed):
    (d / "README.md").write_text("weights go here")
    (d / "notes.txt").write_text("nothing")
    return d, d, "expected one weight file"


def _missing_src(d, seed):
    return d / "nope.safetensors", d / "nope.safetensors", "does not exist"


CASES = {f.__name__[1:]: f for f in (_garbage_safetensors, _truncated_safetensors, _pth_not_a_pickle,
                                     _safetensors_named_pth, _zip_not_torch, _truncated_pth, _truncated_legacy_pth,
                                     _index_missing_shard, _index_not_json, _shard_unreadable, _no_permission,
                                     _no_known_files, _missing_src)}


def _run(main, src, dst, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--src", str(src), "--dst", str(dst)])
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize("converter", sorted(CONVERTERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_source_is_one_line_and_writes_nothing(tmp_path, capsys, seed, converter, case):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src, named, what = CASES[case](src_dir, seed)
    main = CONVERTERS[converter]

    code, err = _run(main, src, tmp_path / "new", capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {named}: ") and what in lines[0], lines[0]
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"  # a checkpoint already at --dst stays exactly as it was
    existing.mkdir()
    (existing / "config.json").write_text('{"kind": "keep me"}')
    code, err = _run(main, src, existing, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in existing.iterdir()) == ["config.json"]
    assert (existing / "config.json").read_text() == '{"kind": "keep me"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "src"], "temporary files left behind"


def test_cli_entry_point_has_no_traceback(tmp_path, seed):
    src, _, _ = _truncated_safetensors(tmp_path, seed)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "convert.wan_vae", "--src", str(src), "--dst", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: {src}: truncated")
    assert not (tmp_path / "o").exists()
