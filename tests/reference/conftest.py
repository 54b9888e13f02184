"""Shim that runs transformers' own v4.56.2 model tests (fetched by fetch_upstream.sh) against glmkit.

What it does, and nothing more: the names the upstream test files import from `transformers` for the three
families (configs and model classes) are bound to glmkit's classes before the files are imported, so every
model and config the tests build is glmkit's. Configs are glmkit's own config classes (same keyword names);
model behaviour is never re-implemented here. Tests that cannot apply are skipped with their reason from
not_applicable.txt. The pipeline mixin is replaced by an empty class (pipelines are transformers' own code
run on hub models; see not_applicable.txt).

It rebinds names inside the `transformers` module for the whole process, so it must never share a process
with the parity tests (which use transformers as the oracle): the folder is collected only when
GLMKIT_REFERENCE_SUITE=1 (.ci/steps/reference.sh).
"""

from __future__ import annotations

import fnmatch
import os
import sys
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
UPSTREAM = HERE / "upstream"
ENABLED = os.environ.get("GLMKIT_REFERENCE_SUITE") == "1"

# only the three families' test files are collected; the mixins are imported by them
_MIXINS = ["upstream/tests/test_*.py", "upstream/tests/generation/*", "upstream/tests/utils/*"]
collect_ignore_glob = _MIXINS if ENABLED else ["*"]

# transformers' public name -> glmkit's public name (identical names: the classes are the same API)
FAMILY_NAMES = (
    "GlmConfig", "GlmModel", "GlmForCausalLM", "GlmForSequenceClassification", "GlmForTokenClassification",
    "XGLMConfig", "XGLMModel", "XGLMForCausalLM", "XGLMPreTrainedModel",
    "PersimmonConfig", "PersimmonModel", "PersimmonForCausalLM", "PersimmonForSequenceClassification",
    "PersimmonForTokenClassification",
    # the auto classes and base classes the mixins construct and recognise models with
    "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
    "PreTrainedModel", "PretrainedConfig",
)  # fmt: skip


def _bind_glmkit_classes() -> None:
    import transformers

    import glmkit

    for name in FAMILY_NAMES:
        setattr(transformers, name, getattr(glmkit, name))
    for module_name in ("glm", "xglm", "persimmon"):  # `from transformers.models.glm import ...` too
        module = sys.modules.get(f"transformers.models.{module_name}")
        if module is not None:
            for name in FAMILY_NAMES:
                if hasattr(module, name):
                    setattr(module, name, getattr(glmkit, name))


def _stub_pipeline_mixin() -> None:
    """The upstream files mix in PipelineTesterMixin; its tests are not applicable (not_applicable.txt), and
    importing it needs transformers' whole pipelines test tree."""
    module = types.ModuleType("tests.test_pipeline_mixin")
    module.PipelineTesterMixin = type("PipelineTesterMixin", (), {})
    sys.modules["tests.test_pipeline_mixin"] = module


def _read_not_applicable() -> list[tuple[str, str]]:
    """`pattern  reason` lines: pattern is `test_name` or `TestClass::test_name` (fnmatch wildcards)."""
    entries = []
    for line in (HERE / "not_applicable.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern, _, reason = line.partition(" ")
            entries.append((pattern, reason.strip()))
    return entries


if ENABLED:
    if not (UPSTREAM / "tests").is_dir():
        raise pytest.UsageError(f"{UPSTREAM} is missing: run tests/reference/fetch_upstream.sh first")
    sys.path.insert(0, str(UPSTREAM))
    _bind_glmkit_classes()
    _stub_pipeline_mixin()
    NOT_APPLICABLE = _read_not_applicable()


def pytest_configure(config: pytest.Config) -> None:
    for mark in ("flash_attn_test", "flash_attn_3_test", "torch_compile_test", "torch_export_test", "order",
                 "generate"):  # fmt: skip
        config.addinivalue_line("markers", f"{mark}: upstream marker")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ENABLED:
        return
    for item in items:
        cls = item.cls.__name__ if item.cls is not None else ""
        name = item.originalname or item.name
        for pattern, reason in NOT_APPLICABLE:
            target = f"{cls}::{name}" if "::" in pattern else name
            if fnmatch.fnmatchcase(target, pattern):
                item.add_marker(pytest.mark.skip(reason=f"not applicable: {reason}"))
                break
