#!/usr/bin/env bash
# transformers' own v4.56.2 model tests for GLM, XGLM and Persimmon, run against glmkit (tests/reference/run.sh), in
# a venv of their own: the shim rebinds transformers' class names, so it never shares a process or an environment
# with the parity tests. The tests are fetched at run time (GitHub tag, else the hash-pinned PyPI sdist), never
# committed. Fails when they cannot be fetched, or when a family passes fewer than 95 % of its applicable tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-reference
. .venv-reference/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[test]" parameterized
MIN_RATE=0.95 OMP_NUM_THREADS=1 bash tests/reference/run.sh
