"""`python -m pickstyle_jax.stylize`: the permanent entry point of the stylize command line, which lives in
pickstyle_jax/sample/cli.py (its docstring, or --help, says what it does)."""
import sys

from pickstyle_jax.sample.cli import build_parser, main, stylize

__all__ = ["stylize", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
