#!/usr/bin/env bash
# XGLM in TensorFlow (tests/tf/): glmkit.tf against transformers' TFXGLM* classes and glmkit's PyTorch model,
# in a venv of its own (the main venv stays free of TensorFlow). The tests skip without TensorFlow in the main suite; here a
# skip is a failure (GLMKIT_REQUIRE_TF makes a missing import an error, and the summary is checked for skips).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-tf
. .venv-tf/bin/activate
pip install -q torch==2.13.0
# the oracles: the test extra's pytest / transformers / protobuf pins, read from pyproject.toml
oracle=$(python -c 'import re, tomllib; test = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print(" ".join(d for d in test if re.split(r"[<>=!~ ]", d)[0] in ("pytest", "transformers", "protobuf")))')
pip install -q -e ".[tf]" $oracle
export GLMKIT_REQUIRE_TF=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
log=$(mktemp)
python -m pytest -q -rs -p no:cacheprovider tests/tf | tee "$log"
if grep -qiE "[0-9]+ skipped|^SKIPPED" "$log"; then
    echo "tf step: tests were skipped; they must run here" >&2
    exit 1
fi
