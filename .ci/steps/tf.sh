#!/usr/bin/env bash
# XGLM in TensorFlow (tests/tf/): glmkit.tf against transformers' TFXGLM* classes and glmkit's PyTorch model.
exec bash "$(dirname "$0")/../optional_stack.sh" tf tf GLMKIT_REQUIRE_TF tests/tf
