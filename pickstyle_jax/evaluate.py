"""`python -m pickstyle_jax.evaluate --source IN.mp4 --stylized OUT.mp4 [--out SCORES.json]`: scores a stylisation
of any clip without ground truth (pickstyle_jax/eval/cli.py). The demo's synthetic ground-truth benchmark is
`python -m pickstyle_jax.demo.evaluate --workdir DIR`."""
import sys

from pickstyle_jax.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
