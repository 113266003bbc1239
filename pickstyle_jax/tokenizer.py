"""The umT5 tokenizer: sentencepiece directly, with the official Wan text cleaning. No transformers at run time.

Behaviour (the reference is transformers' `T5Tokenizer.from_pretrained(dir)` on the same `spiece.model`, applied to
the cleaned text, which is what the official Wan `HuggingfaceTokenizer(clean="whitespace")` does):
  1. clean: ftfy.fix_text -> html.unescape twice -> strip -> collapse whitespace runs to one space -> strip.
  2. literal special-token strings in the text (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`) become their ids, as in
     transformers, where they are added tokens matched on the raw text; the text between them is encoded by
     sentencepiece piece by piece (each piece gets sentencepiece's dummy prefix, as transformers' Metaspace does).
  3. truncate to max_len - 1 tokens (a warning says how many were cut), append `</s>` (id 1), pad with 0 to max_len.
The sentinel `<extra_id_i>` has id n_pieces + extra_ids - 1 - i (transformers' T5 layout). `extra_ids` defaults to
the `extra_ids` of a `tokenizer_config.json` beside the model file, else to 100 (T5Tokenizer's default); that file's
`added_tokens_decoder` (explicit id -> token), when present, overrides the layout. Only special-token strings typed
into a prompt depend on this; ordinary text never reaches those ids.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import warnings
from pathlib import Path

import numpy as np

from pickstyle_jax.errors import InputError

__all__ = ["Tokenizer", "ByteTokenizer", "load_tokenizer", "clean_text"]

_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The official Wan prompt cleaning (`basic_clean` then `whitespace_clean`)."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    return _WS.sub(" ", text).strip()


class Tokenizer:
    """`tok(texts, max_len=512) -> (ids int32 [B, max_len], mask int32 [B, max_len])`; `mask` is 1 on real tokens
    (the closing `</s>` included) and 0 on padding."""

    pad_id = 0
    eos_id = 1

    def __init__(self, spiece_model_path, *, extra_ids: int | None = None):
        import sentencepiece as spm

        path = Path(spiece_model_path)
        if path.is_dir():
            path = path / "spiece.model"
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} not found")
        self.path = path
        data = path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:  # sentencepiece's only error type for a file it cannot parse
            raise InputError(f"{path}: not a sentencepiece model ({' '.join(str(e).split())})") from e
        tok_cfg = self._read_config(path.parent)
        if extra_ids is None:
            extra_ids = int(tok_cfg.get("extra_ids", 100))
        self.extra_ids = int(extra_ids)
        n = self._sp.get_piece_size()
        # transformers' T5 layout: pad 0, eos 1, unk 2 come from the model file; sentinels follow in reverse order.
        if (self._sp.pad_id(), self._sp.eos_id()) != (self.pad_id, self.eos_id):
            raise InputError(f"{path}: expected pad id 0 and eos id 1 (T5 layout), found "
                             f"{self._sp.pad_id()} and {self._sp.eos_id()}")
        self._special = {self._sp.id_to_piece(i): i for i in range(n)
                         if self._sp.is_control(i) or self._sp.is_unknown(i)}
        self._special.update({f"<extra_id_{i}>": n + self.extra_ids - 1 - i for i in range(self.extra_ids)})
        # explicit added tokens of a tokenizer_config.json (id -> token) win over the default layout
        for i, t in (tok_cfg.get("added_tokens_decoder") or {}).items():
            self._special[t["content"] if isinstance(t, dict) else str(t)] = int(i)
        self.vocab_size = max([n - 1, *self._special.values()]) + 1
        # longest first so that no special token is matched by a prefix of a longer one
        alternatives = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        # what makes two tokenizers produce the same ids: the model file, the special tokens and this code's rules
        self.identity = hashlib.sha256(b"umt5-tokenizer-v1\0" + hashlib.sha256(data).digest()
                                       + json.dumps(sorted(self._special.items())).encode()).hexdigest()

    @staticmethod
    def _read_config(folder: Path) -> dict:
        cfg_file = folder / "tokenizer_config.json"
        return json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

    def encode(self, text: str) -> list[int]:
        """Token ids of one cleaned text, without `</s>` and without truncation."""
        if self._special_re is None:
            return list(self._sp.encode(text))
        out: list[int] = []
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:  # odd parts are the captured special tokens
                out.append(self._special[part])
            elif part:
                out.extend(self._sp.encode(part))
        return out

    def __call__(self, texts, max_len: int = 512):
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = np.full((len(texts), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_len), np.int32)
        for b, text in enumerate(texts):
            toks = self.encode(clean_text(text))
            if len(toks) > max_len - 1:
                warnings.warn(f"prompt {b} has {len(toks) + 1} tokens (with </s>); truncated to {max_len}, "
                              f"cutting {len(toks) + 1 - max_len} tokens: {text[:60]!r}...", stacklevel=2)
                toks = toks[:max_len - 1]
            toks.append(self.eos_id)
            ids[b, :len(toks)] = toks
            mask[b, :len(toks)] = 1
        return ids, mask

    def __repr__(self):
        return f"Tokenizer({str(self.path)!r}, pieces={self._sp.get_piece_size()}, extra_ids={self.extra_ids})"


class ByteTokenizer:
    """UTF-8 bytes as token ids (ByT5 layout: 0 pad, 1 `</s>`, 2 unk, byte b -> b + 3), same call as `Tokenizer`.

    For tiny random models and the CPU demo, where no sentencepiece model of the real umT5 exists; it needs a
    vocabulary of at least 259 ids. Text is cleaned exactly as for the real tokenizer.
    """
    pad_id = 0
    eos_id = 1
    vocab_size = 259
    identity = hashlib.sha256(b"byte-tokenizer-v1").hexdigest()

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    __call__ = Tokenizer.__call__

    def __repr__(self):
        return "ByteTokenizer()"


def load_tokenizer(spec: str):
    """A tokenizer from a config string: "bytes" -> ByteTokenizer, else a sentencepiece model file or folder."""
    if spec == "bytes":
        return ByteTokenizer()
    if not spec:
        raise InputError('no tokenizer given: set it to a spiece.model path (or "bytes" for tiny random models)')
    return Tokenizer(spec)
