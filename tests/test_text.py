"""Tokenizer parity with transformers' T5Tokenizer, the text path and the prompt-embedding cache.

The sentencepiece model is trained inside the test (T5 layout: pad 0, eos 1, unk 2, no bos). Random model weights
are fresh every run; the seed is printed (replay a run with PICKSTYLE_TEST_SEED=...).
"""
import os
import random
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pickstyle_jax import checkpoints, text  # noqa: E402
from pickstyle_jax.models import umt5  # noqa: E402
from pickstyle_jax.tokenizer import clean_text  # noqa: E402
from tests.conftest import SEED  # noqa: E402  (the run seed: printed, PICKSTYLE_TEST_SEED replays it)

_CORPUS = """Anime style. A girl walks in the rain under neon lights, reflections on the wet street.
Watercolor style: a cat sleeps on a windowsill; soft light, pastel colours, paper texture.
3D render, Pixar style! A robot waves at the camera. Ünïcödé café naïve — “quotes” and ‘single’.
Numbers 12345 67890 and symbols # @ $ % & * ( ) [ ] { }. Lorem ipsum dolor sit amet, consectetur adipiscing elit.
日本語のテキスト。中文文本。Ελληνικά. Русский текст. 한국어 문장.
Claymation style. An old man reads a newspaper in a park, autumn leaves falling slowly."""

PROMPTS = [
    "Anime style. A girl walks in the rain under neon lights.",
    "  leading,   repeated\tand\ntrailing   whitespace  ",
    "&amp;lt;b&amp;gt; double-escaped &amp; entities: caf&eacute; &quot;quoted&quot;",
    "mojibake cafÃ© and curly “quotes”, fullwidth ＡＢＣ　ｘｙｚ, ligature ﬁ, ½",
    "unknown glyphs ✓ ☃ 𝔘𝔫𝔦 Ω ≈ √ ∫ and a zero\u200bwidth space",
    "日本語のテキスト。 Русский текст.",
    "special tokens in text: a</s>b <pad> <unk> <extra_id_0> <extra_id_99>",
    "",
    "x",
]


def _seed(tag):
    """A seed per call site, derived from the run's seed (conftest: printed, PICKSTYLE_TEST_SEED replays it)."""
    seed = (SEED + sum(map(ord, tag))) % 2**31
    print(f"{tag}: seed={seed} (run seed {SEED})")
    return seed


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spiece")
    words = _CORPUS.split()
    rng = random.Random(0)
    lines = _CORPUS.splitlines() + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "spiece"), model_type="unigram", vocab_size=200,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.995,
        minloglevel=2)
    return d


@pytest.fixture(scope="module")
def tok(spiece_dir):
    return umt5.Tokenizer(spiece_dir / "spiece.model")


def test_tokenizer_matches_transformers(spiece_dir, tok):
    from transformers import T5Tokenizer

    hf = T5Tokenizer.from_pretrained(str(spiece_dir))
    max_len = 128  # long enough that nothing is cut (truncation has its own test)
    ids, mask = tok(PROMPTS, max_len=max_len)
    assert ids.dtype == np.int32 and ids.shape == mask.shape == (len(PROMPTS), max_len)
    # the official Wan tokenizer: clean, then T5Tokenizer(padding="max_length", truncation=True, add_special_tokens)
    ref = hf([clean_text(p) for p in PROMPTS], padding="max_length", truncation=True, max_length=max_len,
             add_special_tokens=True)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"]))
    lens = mask.sum(1)
    assert np.all(ids[np.arange(len(PROMPTS)), lens - 1] == 1)  # </s> closes every prompt
    assert (ids[PROMPTS.index("")] == [1] + [0] * (max_len - 1)).all()
    assert (ids != 2).any() and (ids == 2).any()  # both known and unknown pieces were exercised
    assert clean_text(PROMPTS[1]) == "leading, repeated and trailing whitespace"
    assert clean_text(PROMPTS[2]).startswith('<b> double-escaped & entities: café "quoted"')


_ADDED = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}


def _added_tokens_config(n):
    """A tokenizer_config.json in the style of transformers' saved T5 tokenizers: explicit ids after the n pieces."""
    return {"extra_ids": 0, "additional_special_tokens": ["<extra_id_0>", "<extra_id_1>"],
            "added_tokens_decoder": {"0": {"content": "<pad>", **_ADDED}, "1": {"content": "</s>", **_ADDED},
                                     "2": {"content": "<unk>", **_ADDED},
                                     str(n + 1): {"content": "<extra_id_0>", **_ADDED},
                                     str(n): {"content": "<extra_id_1>", **_ADDED}}}


@pytest.mark.parametrize("make_config", [lambda n: {"extra_ids": 5}, _added_tokens_config],
                         ids=["extra_ids", "added_tokens_decoder"])
def test_tokenizer_special_tokens_follow_tokenizer_config(tmp_path, spiece_dir, make_config):
    import json
    import shutil

    from transformers import T5Tokenizer

    shutil.copy(spiece_dir / "spiece.model", tmp_path / "spiece.model")
    n = umt5.Tokenizer(spiece_dir / "spiece.model", extra_ids=0).vocab_size  # number of sentencepiece pieces
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(make_config(n)))
    prompts = ["a <extra_id_1> b <extra_id_0>c </s> <extra_id_3> <extra_id_7>", "plain text"]
    ours = umt5.Tokenizer(tmp_path / "spiece.model")
    ref = T5Tokenizer.from_pretrained(str(tmp_path))(prompts, padding="max_length", truncation=True, max_length=64)
    np.testing.assert_array_equal(ours(prompts, max_len=64)[0], np.asarray(ref["input_ids"]))
    assert ours.identity != umt5.Tokenizer(spiece_dir / "spiece.model").identity


def test_tokenizer_truncation_warns(spiece_dir, tok):
    from transformers import T5Tokenizer

    hf = T5Tokenizer.from_pretrained(str(spiece_dir))
    long = " ".join(["watercolor painting of a quiet street"] * 20)
    n_full = len(tok.encode(clean_text(long))) + 1
    with pytest.warns(UserWarning, match=f"cutting {n_full - 16} tokens"):
        ids, mask = tok([long, "short"], max_len=16)
    ref = hf([clean_text(long), "short"], padding="max_length", truncation=True, max_length=16)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    assert mask[0].all() and ids[0, -1] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["short"], max_len=16)  # no warning when nothing is cut


@pytest.fixture(scope="module")
def tiny_encoder():
    cfg = umt5.Umt5Config.named("tiny").replace(vocab_size=256)  # the trained sentencepiece + 100 sentinels fit
    return cfg, umt5.init(cfg, jax.random.key(_seed("tiny encoder")))


def test_encode_text_trims_and_zero_pads(tok, tiny_encoder):
    cfg, params = tiny_encoder
    prompts = ["Anime style. A girl walks in the rain.", "x", "Claymation style. " * 6]
    emb, lens = text.encode_text(cfg, params, tok, prompts, text_len=96)
    ids, mask = tok(prompts, max_len=96)
    assert emb.shape == (3, 96, cfg.d_model) and emb.dtype == np.float32
    np.testing.assert_array_equal(lens, mask.sum(1))
    assert lens.max() < 64  # so the encoder ran on a shorter bucket than text_len
    emb = np.asarray(emb)
    for b, n in enumerate(lens):
        assert np.all(emb[b, n:] == 0) and np.all(np.abs(emb[b, :n]).sum(-1) > 0)
    full = np.asarray(umt5.encode(cfg, params, ids, mask))  # the whole 96 slots, no bucketing
    assert float(np.abs(emb - full).max()) <= 1e-5 * float(np.abs(full).max())


def test_cache_reuses_and_keys(tmp_path, tok, tiny_encoder):
    cfg, params = tiny_encoder
    calls = []

    def compute(captions):
        calls.append(list(captions))
        return text.encode_text(cfg, params, tok, captions, text_len=64)

    cache = text.EmbeddingCache(tmp_path / "cache", "encoder-a", tokenizer_id=tok.identity, text_len=64)
    caps = ["Anime style. A cat.", "Watercolor style. A dog.", "Anime style. A cat."]
    e1, l1 = cache.get_or_compute(caps, compute)
    assert calls == [["Anime style. A cat.", "Watercolor style. A dog."]]  # distinct captions, computed once
    e2, l2 = cache.get_or_compute(caps[::-1], compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(e2, e1[::-1])
    np.testing.assert_array_equal(l2, l1[::-1])
    ref, ref_lens = text.encode_text(cfg, params, tok, caps, text_len=64)
    np.testing.assert_array_equal(e1, np.asarray(ref))  # fp32 encoder -> fp32 storage, exact
    np.testing.assert_array_equal(l1, ref_lens)

    other = text.EmbeddingCache(tmp_path / "cache", "encoder-b", tokenizer_id=tok.identity, text_len=64)
    keys = {cache.key(caps[0]), other.key(caps[0]),
            text.EmbeddingCache(tmp_path, "encoder-a", tokenizer_id="other", text_len=64).key(caps[0]),
            text.EmbeddingCache(tmp_path, "encoder-a", tokenizer_id=tok.identity, text_len=512).key(caps[0])}
    assert len(keys) == 4
    assert other.get(caps[0]) is None
    other.get_or_compute(caps[:1], compute)
    assert len(calls) == 2
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".npz")]
    assert not leftovers  # atomic writes leave no temporary files


def test_trim_returns_bucket_rows(tmp_path, tok, tiny_encoder):
    """trim=True: the same embeddings without the all-zero tail, [N, bucket_length(max len), D]."""
    cfg, params = tiny_encoder
    prompts = ["Anime style. A girl walks in the rain under neon lights.", "x"]
    full, lens = text.encode_text(cfg, params, tok, prompts, text_len=96)
    trimmed, lens_t = text.encode_text(cfg, params, tok, prompts, text_len=96, trim=True)
    bucket = text.bucket_length(int(lens.max()), 96)
    assert 16 <= bucket < 96 and trimmed.shape == (2, bucket, cfg.d_model)
    np.testing.assert_array_equal(lens_t, lens)
    np.testing.assert_array_equal(np.asarray(trimmed), np.asarray(full)[:, :bucket])
    assert np.all(np.asarray(full)[:, bucket:] == 0)

    cache = text.EmbeddingCache(tmp_path, "encoder-a", tokenizer_id=tok.identity, text_len=96)
    compute = lambda caps: text.encode_text(cfg, params, tok, caps, text_len=96, trim=True)  # noqa: E731
    caps = ["x", prompts[0], "x"]
    e_trim, l_trim = cache.get_or_compute(caps, compute, trim=True)  # computed (trimmed rows in, as stored)
    e_full, l_full = cache.get_or_compute(caps, compute)             # read back from disk
    assert e_trim.shape == (3, bucket, cfg.d_model) and e_full.shape == (3, 96, cfg.d_model)
    np.testing.assert_array_equal(l_trim, l_full)
    np.testing.assert_array_equal(l_trim, [lens[1], lens[0], lens[1]])
    np.testing.assert_array_equal(e_trim, e_full[:, :bucket])
    np.testing.assert_array_equal(e_full, np.asarray(full)[[1, 0, 1]])
    short, short_lens = cache.get_or_compute(["x"], compute, trim=True)  # one short caption: the smallest bucket
    assert short.shape == (1, 16, cfg.d_model) and short_lens.tolist() == [lens[1]]


def test_cache_stores_bf16_losslessly(tmp_path):
    cache = text.EmbeddingCache(tmp_path, "e")
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    xb = np.asarray(jax.numpy.asarray(x, jax.numpy.bfloat16).astype(np.float32))
    cache.put("a", xb)
    cache.put("b", x)
    assert str(np.load(cache.path("a"))["dtype"]) == "bfloat16"
    assert str(np.load(cache.path("b"))["dtype"]) == "float32"
    np.testing.assert_array_equal(cache.get("a"), xb)
    np.testing.assert_array_equal(cache.get("b"), x)


def test_checkpoint_identity(tmp_path, tiny_encoder):
    cfg, params = tiny_encoder
    a = checkpoints.save(tmp_path / "a", cfg, params, kind="umt5", extra={"params_sha256": "0" * 64})
    b = checkpoints.save(tmp_path / "b", cfg, params, kind="umt5", extra={"params_sha256": "1" * 64})
    c = checkpoints.save(tmp_path / "c", cfg, params, kind="umt5")  # no content hash: file-based fallback
    ids = {text.checkpoint_identity(p) for p in (a, b, c)}
    assert len(ids) == 3
    assert text.checkpoint_identity(a) == text.checkpoint_identity(a)
    assert text.checkpoint_identity(a) != text.checkpoint_identity(a, cfg.replace(dtype="bfloat16"))
    tok_like = type("T", (), {"identity": "t"})()
    cache = text.EmbeddingCache.for_checkpoint(tmp_path / "cache", a, tok_like, text_len=64)
    assert cache.encoder_id == text.checkpoint_identity(a) and cache.tokenizer_id == "t"
