"""`python -m pickstyle_jax.train --config=configs/NAME.py --workdir=DIR`: the training run (loop.py)."""
from pickstyle_jax.train import loop

if __name__ == "__main__":
    loop.main()
