#!/usr/bin/env bash
# lm-evaluation-harness: the `glmkit` harness model against the harness's own `hf` backend on the same tiny
# checkpoints (tests/eval/test_harness*.py), in a venv of its own. The tests skip without lm_eval in the main
# suite; here a skip is a failure (GLMKIT_REQUIRE_LM_EVAL makes a missing import an error, and the summary is
# checked for skips).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-lmeval
. .venv-lmeval/bin/activate
pip install -q torch==2.13.0
# only what these tests import: the test extra's pytest / transformers (the oracle) / protobuf pins, read from
# pyproject.toml, and accelerate (the hf backend's import); transformers 4.56.2 needs huggingface_hub < 1.0,
# which the newest datasets would replace by 1.x
oracle=$(python -c 'import re, tomllib; test = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print(" ".join(d for d in test if re.split(r"[<>=!~ ]", d)[0] in ("pytest", "transformers", "protobuf")))')
pip install -q -e ".[eval]" $oracle accelerate "huggingface_hub>=0.34,<1.0"
export GLMKIT_REQUIRE_LM_EVAL=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
log=$(mktemp)
python -m pytest -q -rs -p no:cacheprovider tests/eval/test_harness.py tests/eval/test_harness_chat.py | tee "$log"
if grep -qiE "[0-9]+ skipped|^SKIPPED" "$log"; then
    echo "lm_eval step: tests were skipped; they must run here" >&2
    exit 1
fi
