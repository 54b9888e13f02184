"""`glmkit` in the harness with a chat template, without prefix reuse, and through `glmkit eval` (the harness's CLI).

Skipped without lm_eval (the main suite); .ci/steps/lm_eval.sh installs it and fails if these skip."""

from __future__ import annotations

import os

import pytest

if os.environ.get("GLMKIT_REQUIRE_LM_EVAL"):  # the CI step: a missing harness is a failure, not a skip
    import accelerate  # noqa: F401
    import lm_eval  # noqa: F401
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the hf backend's import

from .test_harness import assert_same, evaluate, make_setup  # noqa: E402


@pytest.fixture
def glm_setup(tmp_path_factory):
    return make_setup("glm", tmp_path_factory)


def test_chat_template_and_no_prefix_reuse_equal_the_hf_backend(glm_setup):
    """GLM-4's template starts with `[gMASK]<sop>`, which the hf backend's tokenizer then adds again: so do we."""
    _, checkpoint, _, manager = glm_setup
    tasks = ["glmkit_test_mc", "glmkit_test_gen"]
    theirs = evaluate("hf", checkpoint, manager, tasks, apply_chat_template=True)
    ours = evaluate("glmkit", checkpoint, manager, tasks, batch_size=2, extra=",reuse_prefix=False",
                    apply_chat_template=True)  # fmt: skip
    for task in tasks:
        assert_same(ours, theirs, task)


def test_glmkit_eval_runs_the_harness_cli(glm_setup, tmp_path, capsys):
    from glmkit.cli import main

    _, checkpoint, tasks, _ = glm_setup
    status = main(["eval", "--model", "glmkit", "--model_args", f"pretrained={checkpoint},dtype=float32",
                   "--tasks", "glmkit_test_mc", "--include_path", str(tasks), "--batch_size", "4", "--device", "cpu",
                   "--limit", "2", "--output_path", str(tmp_path / "out")])  # fmt: skip
    assert status == 0
    assert "glmkit_test_mc" in capsys.readouterr().out
