#!/usr/bin/env bash
# lm-evaluation-harness: the `glmkit` harness model against the harness's own `hf` backend on the same tiny
# checkpoints (tests/eval/test_harness*.py). accelerate is the hf backend's import; transformers 4.56.2 needs
# huggingface_hub < 1.0, which the newest datasets would replace by 1.x.
EXTRA_PIP='accelerate huggingface_hub>=0.34,<1.0' exec bash "$(dirname "$0")/../optional_stack.sh" lmeval eval \
    GLMKIT_REQUIRE_LM_EVAL tests/eval/test_harness.py tests/eval/test_harness_chat.py
