"""Decode and loading benchmark: glmkit against the reference on the same weights.

    python benchmarks/decode.py [--compile] [--ref-compile] [--batch 1 8] [--dtype bf16] [--device cuda] [--load]
    python benchmarks/decode.py --bundled --stream --lookup   # the bundled default models (engine targets)
    bash benchmarks/gpu.sh [--dry-run]                         # the whole GPU session in one call

The implementation lives in glmkit/bench.py (its docstring has the method) so that `glmkit bench` runs the
same code.
"""

import sys

from glmkit.bench import main

if __name__ == "__main__":
    sys.exit(main())
