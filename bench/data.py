"""Input-pipeline throughput: clip pairs per second through data.make_iterator, per clip size and worker count.

    python bench/data.py                                   # 81x480x832 and the demo size, 0/1/2 workers
    python bench/data.py --sizes 17x64x96 --workers 1,2 --pairs 400
    python bench/data.py --source_scale 1.2                # images 20% larger than the crop: includes the resize

The source is the synthetic world drawn at source_scale x the clip size (1.0: no resize; the drawing itself is
counted, as reading a PNG would be). Timing starts after the first batch, so worker start-up is excluded. Each pair
is a source clip and a style clip (uint8), rendered with a random motion from the official distribution.
"""
from __future__ import annotations

import argparse
import os
import time

from pickstyle_jax import data
from pickstyle_jax.data import synthetic
from pickstyle_jax.train import config as train_config


def measure(frames: int, height: int, width: int, workers: int, pairs: int, batch: int, source_scale: float,
            seed: int = 0) -> dict:
    c = train_config.data_config()
    c.frames, c.height, c.width = frames, height, width
    c.batch_size, c.num_workers, c.num_epochs, c.process_index, c.process_count = batch, workers, None, 0, 1
    src = synthetic.Synthetic(64, round(height * source_scale), round(width * source_scale))
    c.allow_upscale = True
    it = data.make_iterator(c, seed=seed, source=src)
    try:
        next(it)  # start-up (worker spawn, first render) not timed
        n_batches = max(1, pairs // batch)
        t, cpu = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            b = next(it)
        dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    finally:
        it.close()
    n = n_batches * batch
    mb = 2 * b["source"][0].nbytes / 2**20
    return {"size": f"{frames}x{height}x{width}", "workers": workers, "pairs": n, "pairs_per_s": n / dt,
            "ms_per_pair": 1e3 * dt / n, "MB_per_s": n * mb / dt,
            "cpu_ms_per_pair": 1e3 * cpu / n if workers == 0 else float("nan")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="81x480x832,17x64x96", help="comma-separated TxHxW clip sizes")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0 = in-process)")
    p.add_argument("--pairs", type=int, default=0, help="pairs to time per row (0: 16 at >=256x256, else 400)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--source_scale", type=float, default=1.0)
    args = p.parse_args(argv)
    print(f"cpus: {os.cpu_count()}  load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for size in args.sizes.split(","):
        T, H, W = (int(x) for x in size.lower().split("x"))
        for w in (int(x) for x in args.workers.split(",")):
            pairs = args.pairs or (16 if H * W >= 256 * 256 else 400)
            rows.append(measure(T, H, W, w, pairs, args.batch, args.source_scale))
            r = rows[-1]
            print(f"  {r['size']:>12s}  workers {r['workers']}: {r['pairs_per_s']:8.2f} pairs/s", flush=True)
    print()
    print("| clip (TxHxW) | workers | pairs timed | pairs/s | wall ms/pair | CPU ms/pair (in-process) | MB/s out |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['workers']} | {r['pairs']} | {r['pairs_per_s']:.2f} | {r['ms_per_pair']:.1f} | "
              f"{r['cpu_ms_per_pair']:.1f} | {r['MB_per_s']:.0f} |")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
