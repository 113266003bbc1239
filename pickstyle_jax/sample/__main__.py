"""`python -m pickstyle_jax.sample`: the stylize command line (cli.py), as `python -m pickstyle_jax.stylize`."""
import sys

from pickstyle_jax.sample.cli import main

if __name__ == "__main__":
    sys.exit(main())
