"""The package's torch-free LoRA writers: DIR/lora.safetensors (PEFT/diffusers) as training exports it.

The expected diffusers key names are written out here (docs/REFERENCE.md §6), independent of the package's table, and
the file is compared with what safetensors.torch writes for them (convert.lora's exporter before the writer moved
into the package): same parsed header, same data bytes.
"""
import json
import struct

import jax
import numpy as np
import pytest

from pickstyle_jax import lora, lora_export
from pickstyle_jax.models import wan

torch = pytest.importorskip("torch")
st_numpy = pytest.importorskip("safetensors.numpy")
st_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

from convert import lora as convert_lora  # noqa: E402  (test-only: convert imports torch lazily)

RANK, ALPHA = 4, 6.0  # alpha != rank so a lost alpha shows


def _adapters(cfg, seed) -> lora.Lora:
    """A non-zero LoRA on the tiny model's VACE self-attention q/k/v, drawn with numpy."""
    rng = np.random.default_rng(seed)
    a = lora.init(lora.LoraConfig(rank=RANK, alpha=ALPHA), wan.param_shapes(cfg), jax.random.key(seed))
    return jax.tree.map(lambda x: rng.standard_normal(x.shape, dtype=np.float32), a)


def _expected(cfg, adapters) -> dict:
    """{diffusers key: torch-layout fp32 array}, names spelled out by hand."""
    out = {}
    for j in range(len(cfg.vace_layers)):
        for p in "qkv":
            node = adapters.params["vace_blocks"][str(j)]["self_attn"][p]
            out[f"transformer.vace_blocks.{j}.attn1.to_{p}.lora_A.weight"] = np.ascontiguousarray(node["A"].T)
            out[f"transformer.vace_blocks.{j}.attn1.to_{p}.lora_B.weight"] = np.ascontiguousarray(node["B"].T)
    return out


def _parts(path) -> tuple[dict, bytes]:
    """(parsed JSON header, data bytes) of a safetensors file; the header's key order is not deterministic."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_peft_safetensors_loads_and_round_trips(tmp_path, seed):
    cfg = wan.WanConfig.named("tiny")
    adapters = _adapters(cfg, seed)
    path = lora_export.write_peft_safetensors(tmp_path / "lora.safetensors", adapters)
    want = _expected(cfg, adapters)

    # Real safetensors readers, numpy and torch: names, fp32, torch layouts, values, metadata.
    got = st_numpy.load_file(str(path))
    assert sorted(got) == sorted(want) and len(want) == 2 * 3 * len(cfg.vace_layers)
    for k, w in want.items():
        assert got[k].dtype == np.float32 and got[k].shape == w.shape == ((RANK, cfg.dim) if ".lora_A." in k
                                                                          else (cfg.dim, RANK))
        np.testing.assert_array_equal(got[k], w)
    got_t = st_torch.load_file(str(path))
    for k, w in want.items():
        assert got_t[k].dtype == torch.float32
        np.testing.assert_array_equal(got_t[k].numpy(), w)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"lora_alpha": str(ALPHA), "r": str(RANK), "format": "pt"}

    # convert.lora reads it back bit-exact, with alpha and rank.
    back = convert_lora.import_lora(path)
    assert back.config == lora.LoraConfig(rank=RANK, alpha=ALPHA)
    jax.tree.map(np.testing.assert_array_equal, back.params, adapters.params)

    # Same keys as `python -m convert.lora --export`, and the header and bytes safetensors.torch writes for them.
    convert_lora.export_lora(adapters, tmp_path / "cli.safetensors")
    assert sorted(st_numpy.load_file(str(tmp_path / "cli.safetensors"))) == sorted(got)
    st_torch.save_file({k: torch.from_numpy(w) for k, w in want.items()}, str(tmp_path / "ref.safetensors"),
                       metadata={"lora_alpha": str(ALPHA), "r": str(RANK), "format": "pt"})
    assert _parts(path) == _parts(tmp_path / "ref.safetensors")


def test_diffusers_loads_the_adapter(tmp_path, seed):
    """diffusers' own LoRA loader (PEFT) accepts the file and puts every A/B on the right layer.

    (diffusers 0.42 takes alpha from a `lora_adapter_metadata` JSON, not from our `lora_alpha` key, so with
    alpha != rank a diffusers user must pass the scale; PickStyle trains with alpha = rank. Not checked here.)"""
    pytest.importorskip("peft")
    from tests import wan_ref

    cfg = wan.WanConfig.named("tiny")
    adapters = _adapters(cfg, seed)
    path = lora_export.write_peft_safetensors(tmp_path / "lora.safetensors", adapters)
    model = wan_ref.make_diffusers_vace(cfg, seed)
    model.load_lora_adapter(str(path), prefix="transformer", adapter_name="pickstyle")
    want = _expected(cfg, adapters)
    seen = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "pickstyle" in module.lora_A:
            for ab in "AB":
                w = getattr(module, f"lora_{ab}")["pickstyle"].weight.detach().numpy()
                np.testing.assert_array_equal(w, want[f"transformer.{name}.lora_{ab}.weight"])
            seen += 1
    assert seen == 3 * len(cfg.vace_layers)


def test_writers_reject_bad_input(tmp_path):
    with pytest.raises(TypeError, match="str to str"):
        lora_export.write_safetensors(tmp_path / "x.safetensors", {"x": np.zeros(2, np.float32)}, {"alpha": 4.0})
    with pytest.raises(KeyError):
        lora_export.official_to_diffusers_module("vace_blocks.0.bogus")
    assert lora_export.diffusers_to_official_module("vace_blocks.2.attn1.to_out.0") == "vace_blocks.2.self_attn.o"
