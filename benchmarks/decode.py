"""Decode and loading benchmark: glmkit against the reference on the same random weights.

    python benchmarks/decode.py [--compile] [--batch 1 8] [--dtype bf16] [--device cuda] [--load]

The implementation lives in glmkit/bench.py so that `glmkit bench` runs the same code.
"""

import sys

from glmkit.bench import main

if __name__ == "__main__":
    sys.exit(main())
