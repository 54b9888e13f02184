#!/usr/bin/env bash
# XGLM in Flax/JAX (tests/flax/): glmkit.flax against transformers' FlaxXGLM* classes and glmkit's PyTorch model,
# in a venv of its own (the main venv stays free of JAX). The tests skip without JAX in the main suite; here a
# skip is a failure (GLMKIT_REQUIRE_FLAX makes a missing import an error, and the summary is checked for skips).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-flax
. .venv-flax/bin/activate
pip install -q torch==2.13.0
# the oracles: the test extra's pytest / transformers / protobuf pins, read from pyproject.toml
oracle=$(python -c 'import re, tomllib; test = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print(" ".join(d for d in test if re.split(r"[<>=!~ ]", d)[0] in ("pytest", "transformers", "protobuf")))')
pip install -q -e ".[flax]" $oracle
export GLMKIT_REQUIRE_FLAX=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
log=$(mktemp)
python -m pytest -q -rs -p no:cacheprovider tests/flax | tee "$log"
if grep -qiE "[0-9]+ skipped|^SKIPPED" "$log"; then
    echo "flax step: tests were skipped; they must run here" >&2
    exit 1
fi
