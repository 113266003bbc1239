"""umT5 encode throughput: pickstyle_jax vs transformers' UMT5EncoderModel on CPU, same weights, fp32.

  .venv/bin/python bench/umt5.py [--batch 4] [--length 128] [--threads 2] [--iters 10]

Default model: d_model 512, 8 layers, 8 heads x 64, d_ff 1024, vocab 32k (a mid-size umT5, big enough that the
matmuls dominate). Prints sequences/s of both and ours / transformers (> 1 means we are faster).
"""
from __future__ import annotations

import argparse
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import jax
    import numpy as np
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from convert import umt5 as convert_umt5
    from pickstyle_jax.models import umt5

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hc = UMT5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=64, d_ff=args.d_ff, num_layers=args.layers,
                    num_heads=args.heads, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    model = UMT5EncoderModel(hc).eval()
    cfg, params = convert_umt5.convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                                  convert_umt5.config_from_transformers(hc.to_dict()))
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    B, L = args.batch, args.length
    ids = rng.integers(3, args.vocab, size=(B, L)).astype(np.int32)
    lens = np.linspace(L, L // 4, B).astype(int)
    mask = (np.arange(L)[None] < lens[:, None]).astype(np.int32)
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()

    def ours():
        return umt5.encode(cfg, params, ids, mask).block_until_ready()

    def theirs():
        with torch.inference_mode():
            return model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state

    def timeit(fn):
        fn(), fn()  # compile / warm up
        best = float("inf")
        for _ in range(3):  # best of 3 rounds: the machine is shared
            t = time.perf_counter()
            for _ in range(args.iters):
                fn()
            best = min(best, (time.perf_counter() - t) / args.iters)
        return best

    valid = mask.astype(bool)
    a, b = np.asarray(ours()), theirs().numpy()
    err = np.linalg.norm(a[valid] - b[valid]) / np.linalg.norm(b[valid])
    t_ours, t_theirs = timeit(ours), timeit(theirs)
    print(f"config: d_model {args.d_model}, {args.layers} layers, {args.heads} heads x 64, d_ff {args.d_ff}, "
          f"vocab {args.vocab}; batch {B} x {L} tokens; fp32 CPU; torch {args.threads} threads, XLA its default pool "
          f"over {os.cpu_count()} visible cores; jax {jax.__version__}, "
          f"torch {torch.__version__}")
    print(f"outputs agree: relative L2 {err:.1e}")
    print(f"pickstyle_jax : {B / t_ours:8.2f} seq/s ({1e3 * t_ours:.1f} ms/batch)")
    print(f"transformers  : {B / t_theirs:8.2f} seq/s ({1e3 * t_theirs:.1f} ms/batch)")
    print(f"ratio ours/transformers: {t_theirs / t_ours:.2f}x")


if __name__ == "__main__":
    main()
