#!/usr/bin/env bash
# Fetch transformers' own v4.56.2 tests (Apache-2.0, (c) The HuggingFace Team) into tests/reference/upstream/
# (git-ignored): fetched, not committed, so the files stay byte-identical to the release and third-party code stays
# out of glmkit's history. tests/reference/conftest.py (the shim) points them at glmkit's classes.
#
# Two sources, tried in this order; upstream/.source says which one was used:
#  1. github: the v4.56.2 tag (sparse clone): the three families' test files, causal_lm_tester.py, the generation
#     mixin (tests/generation/test_utils.py) and tests/utils/test_configuration_utils.py, plus the common mixins.
#  2. pypi-sdist: the transformers==4.56.2 sdist from PyPI (the release artifact, hash-pinned below), for machines
#     that reach only package registries (CI). It ships tests/test_modeling_common.py (ModelTesterMixin) and
#     tests/test_configuration_common.py (ConfigTester) but no family files and no generation mixin; the shim then
#     runs glmkit's stand-in family modules (tests/reference/test_standin_*.py) with those two mixins. The sdist has
#     no tests/__init__.py either; an empty one is written (test_configuration_common.py imports its own package).
# Exits non-zero when neither source can be fetched. Delete upstream/ to fetch again.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/upstream"
version=4.56.2
sdist_sha256=5e7c623e2d7494105c726dd10f6f90c2c99a55ebe86eef7233765abd0cb1c529
if [ -f "$dest/.source" ] && grep -q "$version" "$dest/.source"; then
    echo "reference suite: using $(cat "$dest/.source")"
    exit 0
fi
rm -rf "$dest" && mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

clone="$work/clone"
if timeout "${GITHUB_TIMEOUT_S:-60}" git clone -q --depth 1 --branch "v$version" --filter=blob:none --sparse \
        https://github.com/huggingface/transformers "$clone" &&
    # cone mode: these folders plus the files directly in tests/ (test_modeling_common.py, causal_lm_tester.py, ...)
    timeout "${GITHUB_TIMEOUT_S:-60}" git -C "$clone" sparse-checkout set tests/models/glm tests/models/xglm \
        tests/models/persimmon tests/generation tests/utils; then
    mkdir -p "$dest/tests/models" "$dest/tests/generation" "$dest/tests/utils"
    cp "$clone"/tests/*.py "$dest/tests/"
    cp -r "$clone"/tests/models/{__init__.py,glm,xglm,persimmon} "$dest/tests/models/"
    cp "$clone"/tests/generation/{__init__.py,test_utils.py} "$dest/tests/generation/"
    cp "$clone"/tests/utils/{__init__.py,test_configuration_utils.py} "$dest/tests/utils/"
    cp "$clone/LICENSE" "$dest/LICENSE"
    echo "github v$version $(git -C "$clone" rev-parse HEAD)" > "$dest/.source"
else
    echo "reference suite: GitHub unreachable, falling back to the PyPI sdist" >&2
    pkg="transformers-$version"
    echo "transformers==$version --hash=sha256:$sdist_sha256" > "$work/requirement.txt"
    if ! python -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$work/requirement.txt" \
            -d "$work"; then
        rm -rf "$dest"
        echo "reference suite: could fetch transformers $version's tests from neither GitHub nor PyPI" >&2
        exit 1
    fi
    tar -xzf "$work/$pkg.tar.gz" -C "$work" "$pkg/tests" "$pkg/LICENSE"
    mkdir -p "$dest/tests"
    cp "$work/$pkg"/tests/*.py "$dest/tests/"
    cp "$work/$pkg/LICENSE" "$dest/LICENSE"
    : > "$dest/tests/__init__.py"  # the package marker the sdist omits: an empty file of glmkit's, the one non-upstream file
    echo "pypi-sdist transformers==$version sha256:$sdist_sha256 (+ empty tests/__init__.py)" > "$dest/.source"
fi
echo "reference suite: using $(cat "$dest/.source")"
