#!/usr/bin/env bash
# Run transformers' own v4.56.2 tests for the three families against glmkit (see conftest.py), in the current
# Python environment (glmkit with its [test] extra, plus parameterized). CI runs it as .ci/steps/reference.sh.
# fetch_upstream.sh takes the tests from the v4.56.2 tag on GitHub (the family files, causal_lm_tester.py and the
# generation mixin run) or, where GitHub is out of reach as in CI, from the PyPI sdist (ModelTesterMixin and
# ConfigTester run through glmkit's stand-in family modules, test_standin_*.py; no generation mixin tests). Prints
# the source, then passed / failed / not applicable / skipped upstream per family; exits 1 when nothing could be
# fetched or collected, or when a family passes fewer than MIN_RATE (default 0.95) of its applicable tests.
# About 2-4 min on 2 CPU cores from the sdist.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/reference/fetch_upstream.sh
xml=$(mktemp --suffix .xml)
GLMKIT_REFERENCE_SUITE=1 HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider -W ignore --tb=line \
    --junitxml="$xml" tests/reference || true
python tests/reference/summary.py "$xml" --min-rate "${MIN_RATE:-0.95}"
