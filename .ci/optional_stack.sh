#!/usr/bin/env bash
# One optional stack's tests in a venv of its own (the main venv stays free of it), for the steps in .ci/steps/:
#   bash .ci/optional_stack.sh NAME EXTRA REQUIRE_VAR TEST_PATH... (env EXTRA_PIP: more pip arguments)
# The venv gets torch first (the pinned CPU build), then glmkit[EXTRA] and the oracles the tests import: the test
# extra's pytest / transformers / protobuf pins, read from pyproject.toml. The tests skip without their stack in
# the main suite; here REQUIRE_VAR=1 makes a missing import an error and any skip fails the step.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 extra=$2 require=$3
shift 3
python3 -m venv ".venv-$name"
. ".venv-$name/bin/activate"
pip install -q torch==2.13.0
oracle=$(python -c 'import re, tomllib; test = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print(" ".join(d for d in test if re.split(r"[<>=!~ ]", d)[0] in ("pytest", "transformers", "protobuf")))')
# shellcheck disable=SC2086  # EXTRA_PIP and oracle are lists of requirements
pip install -q -e ".[$extra]" $oracle ${EXTRA_PIP:-}
export "$require=1" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
log=$(mktemp)
python -m pytest -q -rs -p no:cacheprovider "$@" | tee "$log"
if grep -qiE "[0-9]+ skipped|^SKIPPED" "$log"; then
    echo "$name step: tests were skipped; they must run here" >&2
    exit 1
fi
