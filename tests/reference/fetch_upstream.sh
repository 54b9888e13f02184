#!/usr/bin/env bash
# Fetch transformers' own model tests for GLM, XGLM and Persimmon and the common mixins they import, pinned to
# the v4.56.2 tag (Apache-2.0, (c) The HuggingFace Team), into tests/reference/upstream/ (git-ignored). They
# are fetched, not committed: the files stay byte-identical to the tag and third-party code stays out of
# glmkit's history. tests/reference/conftest.py (the shim) points them at glmkit's classes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/upstream"
tag=v4.56.2
if [ -f "$dest/.tag" ] && [ "$(cat "$dest/.tag")" = "$tag" ]; then exit 0; fi
rm -rf "$dest" && mkdir -p "$dest"
clone=$(mktemp -d)
trap 'rm -rf "$clone"' EXIT
git clone -q --depth 1 --branch "$tag" --filter=blob:none --sparse https://github.com/huggingface/transformers "$clone"
# cone mode: these folders plus the files directly in tests/ (test_modeling_common.py, causal_lm_tester.py, ...)
git -C "$clone" sparse-checkout set tests/models/glm tests/models/xglm tests/models/persimmon tests/generation \
    tests/utils
mkdir -p "$dest/tests/models"
cp "$clone"/tests/*.py "$dest/tests/"
cp -r "$clone"/tests/models/{__init__.py,glm,xglm,persimmon} "$dest/tests/models/"
mkdir -p "$dest/tests/generation" "$dest/tests/utils"
cp "$clone"/tests/generation/{__init__.py,test_utils.py} "$dest/tests/generation/"
cp "$clone"/tests/utils/{__init__.py,test_configuration_utils.py} "$dest/tests/utils/"
cp "$clone/LICENSE" "$dest/LICENSE"
git -C "$clone" rev-parse HEAD > "$dest/.commit"
echo "$tag" > "$dest/.tag"
