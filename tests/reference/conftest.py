"""Shim that runs transformers' own v4.56.2 model tests (fetched by fetch_upstream.sh) against glmkit.

What it does, and nothing more: the names the upstream test files import from `transformers` for the three
families (configs and model classes) are bound to glmkit's classes before the files are imported, so every
model and config the tests build is glmkit's. Configs are glmkit's own config classes (same keyword names);
model behaviour is never re-implemented here. Tests that cannot apply are skipped with their reason from
not_applicable.txt. The pipeline mixin is replaced by an empty class (pipelines are transformers' own code
run on hub models; see not_applicable.txt).

Where upstream's family files were fetched (GitHub), they run. Where only the PyPI sdist could be fetched, it has
ModelTesterMixin and ConfigTester but no family files, no generation mixin and no
tests/utils/test_configuration_utils.py: glmkit's stand-in family modules (test_standin_*.py) run the two mixins
instead, the generation mixin's import gets an empty placeholder (so none of its tests run) and ConfigTester's
`config_common_kwargs` gets glmkit's own stand-in dict (below).

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

# only the three families' test files are collected; the mixins are imported by them. A family's stand-in module is
# collected only where upstream's own file for it is absent (sdist fetch).
_MIXINS = ["upstream/tests/test_*.py", "upstream/tests/generation/*", "upstream/tests/utils/*"]
_STAND_INS = [f"test_standin_{family}.py" for family in ("glm", "xglm", "persimmon")
              if (UPSTREAM / "tests" / "models" / family).is_dir()]  # fmt: skip
collect_ignore_glob = _MIXINS + _STAND_INS if ENABLED else ["*"]

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
    # testing_utils imports the Trainer and with it processing_utils, whose direct_transformers_import re-runs
    # transformers/__init__.py and so puts a fresh `transformers` module into sys.modules: bind only after that.
    import transformers.testing_utils  # noqa: F401

    import glmkit

    transformers = sys.modules["transformers"]

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


def _stand_in_missing_upstream_modules() -> None:
    """The sdist lacks the generation mixin and tests/utils/test_configuration_utils.py, which
    test_modeling_common.py and test_configuration_common.py import; give those imports placeholders."""
    tests = UPSTREAM / "tests"
    if not (tests / "generation" / "test_utils.py").exists():
        sys.modules["tests.generation"] = types.ModuleType("tests.generation")
        module = types.ModuleType("tests.generation.test_utils")
        module.GenerationTesterMixin = type("GenerationTesterMixin", (), {})  # no generation tests run
        sys.modules["tests.generation.test_utils"] = module
        reason = "the sdist has no generation mixin (its stand-in is an empty class): no inheritance to check"
        NOT_APPLICABLE.append(("test_generation_tester_mixin_inheritance", reason))
    if not (tests / "utils" / "test_configuration_utils.py").exists():
        sys.modules["tests.utils"] = types.ModuleType("tests.utils")
        module = types.ModuleType("tests.utils.test_configuration_utils")
        module.config_common_kwargs = STAND_IN_CONFIG_COMMON_KWARGS
        sys.modules["tests.utils.test_configuration_utils"] = module


# glmkit's stand-in for upstream's `config_common_kwargs` (ConfigTester.check_config_arguments_init builds a config
# from these and checks each is kept): generic keys every transformers 4.56 config takes, at non-default values.
STAND_IN_CONFIG_COMMON_KWARGS = {
    "return_dict": False, "output_hidden_states": True, "output_attentions": True, "dtype": "float16",
    "tie_word_embeddings": False, "is_decoder": True, "chunk_size_feed_forward": 4, "architectures": ["SomeModel"],
    "finetuning_task": "summarization", "id2label": {0: "negative", 1: "positive"},
    "label2id": {"negative": 0, "positive": 1}, "tokenizer_class": "SomeTokenizer", "prefix": "summarize: ",
    "bos_token_id": 5, "pad_token_id": 6, "eos_token_id": 7, "sep_token_id": 8, "decoder_start_token_id": 9,
    "task_specific_params": {"summarization": {"max_length": 20}}, "problem_type": "single_label_classification",
}  # fmt: skip


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
    if not (UPSTREAM / "tests" / "test_modeling_common.py").is_file():
        raise pytest.UsageError(f"{UPSTREAM} is missing: run tests/reference/fetch_upstream.sh first")
    sys.path.insert(0, str(UPSTREAM))
    NOT_APPLICABLE = _read_not_applicable()
    _bind_glmkit_classes()
    _stub_pipeline_mixin()
    _stand_in_missing_upstream_modules()


def pytest_configure(config: pytest.Config) -> None:
    for mark in ("flash_attn_test", "flash_attn_3_test", "torch_compile_test", "torch_export_test", "order",
                 "generate"):  # fmt: skip
        config.addinivalue_line("markers", f"{mark}: upstream marker")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ENABLED:
        return
    import glmkit

    unbound = [name for name in FAMILY_NAMES if getattr(sys.modules["transformers"], name) is not getattr(glmkit, name)]
    if unbound:  # something replaced the `transformers` module after the binding: the tests would run transformers
        raise pytest.UsageError(f"transformers' {', '.join(unbound)} are no longer bound to glmkit's classes")
    for item in items:
        cls = item.cls.__name__ if item.cls is not None else ""
        name = item.originalname or item.name
        for pattern, reason in NOT_APPLICABLE:
            target = f"{cls}::{name}" if "::" in pattern else name
            if fnmatch.fnmatchcase(target, pattern):
                item.add_marker(pytest.mark.skip(reason=f"not applicable: {reason}"))
                break
