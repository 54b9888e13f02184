#!/usr/bin/env bash
# XGLM in Flax/JAX (tests/flax/): glmkit.flax against transformers' FlaxXGLM* classes and glmkit's PyTorch model.
exec bash "$(dirname "$0")/../optional_stack.sh" flax flax GLMKIT_REQUIRE_FLAX tests/flax
