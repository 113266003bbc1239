"""umT5 encoder: parity with transformers' UMT5EncoderModel (fp32), bf16 accuracy, and the converter.

Every run draws fresh random weights and inputs; the seed is printed (replay a run with PICKSTYLE_TEST_SEED=...).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from convert import umt5 as convert_umt5  # noqa: E402
from convert.common import ConversionError  # noqa: E402
from pickstyle_jax import checkpoints  # noqa: E402
from pickstyle_jax.models import umt5  # noqa: E402
from tests.conftest import SEED  # noqa: E402  (the run seed: printed, PICKSTYLE_TEST_SEED replays it)

transformers = pytest.importorskip("transformers")


def _seed(tag):
    """A seed per call site, derived from the run's seed (conftest: printed, PICKSTYLE_TEST_SEED replays it)."""
    seed = (SEED + sum(map(ord, tag))) % 2**31
    print(f"{tag}: seed={seed} (run seed {SEED})")
    return seed


def _hf_model(seed, *, vocab=300, d_model=64, d_kv=12, d_ff=96, layers=3, heads=4):
    """A tiny UMT5EncoderModel with every tensor randomised (d_model != heads * d_kv on purpose)."""
    from transformers import UMT5Config, UMT5EncoderModel

    hc = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
    model = UMT5EncoderModel(hc).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * r)
            elif p.ndim == 2 and "relative_attention_bias" not in name and "shared" not in name:
                p.copy_(r / p.shape[1] ** 0.5)  # Linear [out, in]
            else:  # embeddings and relative position tables
                p.copy_(r)
    return hc, model


def _inputs(rng, vocab, lens, L):
    ids = rng.integers(3, vocab, size=(len(lens), L))
    mask = (np.arange(L)[None] < np.asarray(lens)[:, None]).astype(np.int32)
    ids[np.arange(len(lens)), np.asarray(lens) - 1] = 1  # </s>
    return np.where(mask, ids, 0), mask


def _sd(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_buckets_match_transformers():
    from transformers.models.umt5.modeling_umt5 import UMT5Attention
    from transformers import UMT5Config

    attn = UMT5Attention(UMT5Config(relative_attention_num_buckets=32, relative_attention_max_distance=128),
                         has_relative_attention_bias=True)
    L = 400
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    np.testing.assert_array_equal(umt5.relative_position_buckets(L, L, 32, 128), ref)


def test_parity_with_transformers_fp32():
    seed = _seed("parity")
    hc, model = _hf_model(seed)
    cfg, params = convert_umt5.convert_state_dict(_sd(model), convert_umt5.config_from_transformers(hc.to_dict()))
    assert cfg.dtype == "float32" and cfg.num_heads * cfg.d_kv != cfg.d_model
    rng = np.random.default_rng(seed)
    L = 160  # beyond max_distance 128: exercises the far buckets
    ids, mask = _inputs(rng, hc.vocab_size, [L, 97, 5], L)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    out = np.asarray(umt5.encode(cfg, params, ids, mask))
    assert out.dtype == np.float32 and out.shape == (3, L, hc.d_model)
    valid = mask.astype(bool)
    err = _rel(out[valid], ref[valid])
    print(f"fp32 relative L2 vs transformers: {err:.2e}")
    assert err <= 1e-5
    assert np.all(out[~valid] == 0.0)


def test_bf16_close_to_fp32():
    seed = _seed("bf16")
    hc, model = _hf_model(seed)
    cfg, params = convert_umt5.convert_state_dict(_sd(model), convert_umt5.config_from_transformers(hc.to_dict()))
    cfg16 = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    params16 = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
    ids, mask = _inputs(np.random.default_rng(seed), hc.vocab_size, [64, 20], 64)
    ref = np.asarray(umt5.encode(cfg, params, ids, mask))
    out = np.asarray(umt5.encode(cfg16, params16, ids, mask))
    valid = mask.astype(bool)
    err = _rel(out[valid], ref[valid])
    print(f"bf16 relative L2 vs fp32: {err:.2e}")
    assert out.dtype == np.float32 and np.all(out[~valid] == 0.0)
    assert err <= 5e-2  # measured 1.8e-2 .. 2.4e-2: bf16 weights alone give ~1.2e-2 on this sharp random model


def test_init_matches_converted_layout():
    cfg = umt5.Umt5Config.named("tiny")
    seed = _seed("init")
    params = umt5.init(cfg, jax.random.key(seed))
    names = set(convert_umt5.table(cfg))
    assert names == set(convert_umt5.expected_shapes(cfg))
    assert "blocks.1.pos_embedding.embedding.embedding" in names
    axes = umt5.param_axes(cfg)  # the same tree, leaves the logical axis names the sharding rules read
    assert jax.tree.structure(axes, is_leaf=lambda a: isinstance(a, tuple)) == jax.tree.structure(params)
    assert axes["token_embedding"]["embedding"] == ("vocab", "embed")
    assert axes["blocks"]["1"]["attn"]["q"]["kernel"] == ("embed", "heads")
    assert axes["blocks"]["1"]["attn"]["o"]["kernel"] == ("heads", "embed")
    assert axes["blocks"]["0"]["ffn"]["fc2"]["kernel"] == ("mlp", "embed")
    assert axes["blocks"]["0"]["pos_embedding"]["embedding"]["embedding"] == (None, None)
    shapes = umt5.param_shapes(cfg)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda a: a.shape, params)
    ids, mask = _inputs(np.random.default_rng(seed), cfg.vocab_size, [9, 4], 16)
    out = np.asarray(umt5.encode(cfg, params, ids, mask))
    assert np.isfinite(out).all() and np.all(out[mask == 0] == 0)


def _official_pth(model, path):
    """The same weights under the official Wan key names, built with the inverse of the converter's table."""
    sd = model.state_dict()
    to_official = {t: o for o, t in convert_umt5.transformers_keys(model.config.num_layers).items()}
    official = {to_official[k]: v.clone() for k, v in sd.items() if k in to_official}
    assert len(official) == len(to_official)
    torch.save(official, path)
    return official


def test_official_and_transformers_conversions_agree(tmp_path):
    seed = _seed("convert")
    hc, model = _hf_model(seed, layers=2)
    model.save_pretrained(tmp_path / "hf")
    _official_pth(model, tmp_path / convert_umt5.OFFICIAL_FILE)

    convert_umt5.main(["--src", str(tmp_path / "hf"), "--dst", str(tmp_path / "a")])
    convert_umt5.convert(tmp_path / convert_umt5.OFFICIAL_FILE, tmp_path / "b")
    cfg_a, pa = checkpoints.load_umt5(tmp_path / "a")
    cfg_b, pb = checkpoints.load_umt5(tmp_path / "b")
    assert cfg_a == cfg_b
    fa, fb = jax.tree_util.tree_leaves_with_path(pa), jax.tree_util.tree_leaves_with_path(pb)
    assert [k for k, _ in fa] == [k for k, _ in fb]
    for (k, a), (_, b) in zip(fa, fb):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), k
    meta_a, meta_b = checkpoints.read_meta(tmp_path / "a"), checkpoints.read_meta(tmp_path / "b")
    assert meta_a["params_sha256"] == meta_b["params_sha256"]

    wan = tmp_path / "wan"  # a Wan folder: the official T5 file beside the DiT's own config.json
    wan.mkdir()
    (wan / "config.json").write_text('{"model_type": "vace", "dim": 64}')
    (tmp_path / convert_umt5.OFFICIAL_FILE).rename(wan / convert_umt5.OFFICIAL_FILE)
    sd, hf = convert_umt5._open(wan)
    assert hf is None and convert_umt5.detect_format(sd) == "official"

    convert_umt5.convert(wan, tmp_path / "c", dtype="bfloat16")
    cfg_c, pc = checkpoints.load_umt5(tmp_path / "c")
    assert cfg_c.param_dtype == cfg_c.dtype == "bfloat16"
    assert pc["blocks"]["1"]["attn"]["q"]["kernel"].dtype == jax.numpy.bfloat16


def test_strict_errors_name_every_bad_key():
    _, model = _hf_model(_seed("strict"), layers=2)
    sd = _sd(model)
    cfg = convert_umt5.config_from_shapes(sd, "transformers")
    assert (cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (2, 4, 12, 96)
    bad = dict(sd)
    del bad["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    bad["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.zeros((3, 3), np.float32)
    bad["encoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((47, 64), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_umt5.convert_state_dict(bad, cfg)
    msg = str(e.value)
    for key in ("encoder.block.1.layer.1.DenseReluDense.wi_1.weight", "SelfAttention.extra.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight"):
        assert key in msg, key

    only_alias = {k: v for k, v in sd.items() if k != "shared.weight"}
    convert_umt5.convert_state_dict(only_alias, cfg)  # the tied alias alone is enough
    untied = dict(sd)
    untied["encoder.embed_tokens.weight"] = sd["shared.weight"] + 1.0
    with pytest.raises(ConversionError, match="tied"):
        convert_umt5.convert_state_dict(untied, cfg)

    official = {o: sd[t] for o, t in convert_umt5.transformers_keys(2).items()}
    official["blocks.5.norm1.weight"] = official["norm.weight"]
    with pytest.raises(ConversionError, match=r"blocks\.5\.norm1\.weight"):
        convert_umt5.convert_state_dict(official, cfg)
