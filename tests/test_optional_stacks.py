"""The TensorFlow / Flax XGLM classes are optional: `import glmkit` loads neither stack, and asking for a class
whose stack is missing is an ImportError naming the extra to install."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import glmkit

REPO = Path(__file__).resolve().parents[1]
STACKS = {"FlaxXGLMForCausalLM": ("flax", "jax"), "FlaxXGLMModel": ("flax", "jax"),
          "TFXGLMForCausalLM": ("tf", "tensorflow"), "TFXGLMModel": ("tf", "tensorflow")}  # fmt: skip


def test_import_glmkit_loads_neither_stack():
    code = "import sys, glmkit; print(sorted({'tensorflow', 'tf_keras', 'jax', 'flax'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(STACKS))
def test_missing_stack_names_the_extra(name):
    extra, module = STACKS[name]
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here; tests/{extra}/ covers the class")
    with pytest.raises(ImportError, match=rf"pip install 'glmkit\[{extra}\]'"):
        getattr(glmkit, name)


def test_unknown_attribute_is_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchModel"):
        glmkit.NoSuchModel  # noqa: B018
