"""Everything that exists only for the CPU demo (`python -m pickstyle_jax.demo`, `make demo`).

- `__main__`  the demo driver: pretrain -> LoRA training (pickstyle_jax.train) -> benchmark
- `pretrain`  the demo's own tiny base models (umT5, autoencoder, Wan-VACE backbone), fitted on the synthetic world
- `conv_ae`   the plain conv autoencoder; it plugs into production through models/autoencoders.py's protocol (its
              checkpoints name it in config.json's "codec")
- `world`     the held-out motion world: moving synthetic scenes with exact ground truth and motion
- `evaluate`  the synthetic ground-truth benchmark and its ablations (`python -m pickstyle_jax.demo.evaluate`)

This package may import anything in pickstyle_jax; no production module imports it (tests/test_evaluate.py checks).
"""
