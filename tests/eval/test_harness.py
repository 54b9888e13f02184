"""`glmkit` as an lm-evaluation-harness model: the same metrics and per-sample numbers as the harness's own `hf`
backend on the same checkpoint, for local multiple-choice, rolling-perplexity and generate-until tasks.

Skipped without lm_eval (the main suite); .ci/steps/lm_eval.sh installs it and fails if these skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("GLMKIT_REQUIRE_LM_EVAL"):  # the CI step: a missing harness is a failure, not a skip
    import accelerate  # noqa: F401
    import lm_eval  # noqa: F401
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the hf backend's import

from lm_eval.tasks import TaskManager  # noqa: E402

import glmkit.eval.harness as harness  # noqa: E402

from .conftest import build_checkpoint  # noqa: E402

QUESTIONS = [
    ("ROMEO: What light through yonder", [" window breaks", " door", " sun is rising", " lord"], 0),
    ("JULIET: O Romeo, Romeo,", [" wherefore art thou", " where", " I love thee\nso"], 1),
    ("KING: my lords,", [" the queen is dead.", " away!", " now"], 2),
    ("FIRST CITIZEN:\nBefore we proceed", [" any further", ", hear me speak", " no"], 0),
]
DOCUMENTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"
    "You are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.",
    "ROMEO: short one.",
    "MENENIUS:\nEither you must confess yourselves wondrous malicious, or be accused of folly.",
]
# (persimmon's random checkpoint turns "First Citizen:\nBefore" into an invalid UTF-8 byte run, which glmkit's
# tokenizer and transformers' ByteFallback decoder render differently: a tokenizer matter, kept out of here)
PROMPTS = [("ROMEO:", "x"), ("JULIET: O Romeo", "y"), ("KING:\nmy", "z"), ("All:\nSpeak", "w")]


def write_tasks(directory: Path) -> None:
    """Three task YAMLs reading local JSONL files (the offline recipe the README shows)."""
    rows = {
        "mc": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
        "rolling": [{"text": t} for t in DOCUMENTS],
        "gen": [{"prompt": p, "target": t} for p, t in PROMPTS],
    }
    for name, items in rows.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    specs = {
        "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
              "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                   "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        "gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
               "generation_kwargs:\n  until: ['\\n', '.']\n  max_gen_toks: 12\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n",
    }  # fmt: skip
    for name, spec in specs.items():
        header = f"task: glmkit_test_{name}\n" + common.format(path=directory / f"{name}.jsonl")
        (directory / f"glmkit_test_{name}.yaml").write_text(header + spec)


_SETUPS: dict[str, tuple] = {}


def make_setup(family: str, tmp_path_factory) -> tuple[str, Path, Path, TaskManager]:
    """(family, checkpoint, task folder, task manager), made once per family."""
    if family not in _SETUPS:
        directory = tmp_path_factory.mktemp(family)
        build_checkpoint(family, directory / "ckpt")
        tasks = directory / "tasks"
        tasks.mkdir()
        write_tasks(tasks)
        manager = TaskManager(include_path=str(tasks), include_defaults=False)
        _SETUPS[family] = family, directory / "ckpt", tasks, manager
    return _SETUPS[family]


@pytest.fixture(params=["glm", "xglm", "persimmon"])
def setup(request, tmp_path_factory):
    return make_setup(request.param, tmp_path_factory)


@pytest.fixture
def glm_setup(tmp_path_factory):
    return make_setup("glm", tmp_path_factory)


def evaluate(model: str, checkpoint: Path, manager: TaskManager, tasks: list[str], batch_size: int | str = 3,
             extra: str = "", **kwargs) -> dict:  # fmt: skip
    return lm_eval.simple_evaluate(model=model, model_args=f"pretrained={checkpoint},dtype=float32{extra}",
                                   tasks=tasks, task_manager=manager, batch_size=batch_size, device="cpu",
                                   log_samples=True, bootstrap_iters=0, **kwargs)  # fmt: skip


def numbers(result: dict, task: str) -> tuple[dict, list]:
    metrics = {k: v for k, v in result["results"][task].items() if isinstance(v, float)}
    samples = [(s["doc_id"], s["resps"]) for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]
    return metrics, samples


def assert_same(ours: dict, theirs: dict, task: str) -> None:
    (metrics, samples), (ref_metrics, ref_samples) = numbers(ours, task), numbers(theirs, task)
    assert metrics.keys() == ref_metrics.keys() and metrics
    for name, value in ref_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4), (task, name)
    assert len(samples) == len(ref_samples)
    for (doc, resps), (ref_doc, ref_resps) in zip(samples, ref_samples):
        assert doc == ref_doc
        for ours_resp, ref_resp in zip(resps, ref_resps):
            if isinstance(ref_resp[0], str):  # generated text
                assert ours_resp == ref_resp, (task, doc)
            else:  # (loglikelihood, is_greedy) or a rolling loglikelihood
                ref_value = ref_resp[0][0] if isinstance(ref_resp[0], (list, tuple)) else ref_resp[0]
                value = ours_resp[0][0] if isinstance(ours_resp[0], (list, tuple)) else ours_resp[0]
                assert value == pytest.approx(ref_value, rel=1e-4), (task, doc)


def test_metrics_equal_the_hf_backend(setup):
    _, checkpoint, _, manager = setup
    tasks = ["glmkit_test_mc", "glmkit_test_rolling", "glmkit_test_gen"]
    # max_length 24: the rolling documents span several windows and long contexts are truncated
    theirs = evaluate("hf", checkpoint, manager, tasks, extra=",max_length=24")
    ours = evaluate("glmkit", checkpoint, manager, tasks, batch_size="4", extra=",max_length=24")
    for task in tasks:
        assert_same(ours, theirs, task)
    assert any(s["resps"][0][0].strip() for s in ours["samples"]["glmkit_test_gen"]), "nothing was generated"


def test_model_args_are_checked(glm_setup):
    _, checkpoint, _, _ = glm_setup
    with pytest.raises(TypeError, match="unknown model_args: colour"):
        harness.GlmkitLM(pretrained=str(checkpoint), colour="red")
    with pytest.raises(ValueError, match="batch_size"):
        harness.GlmkitLM(pretrained=str(checkpoint), batch_size="many")
    lm = harness.GlmkitLM(pretrained=str(checkpoint), batch_size="auto", newlines_to_eos=True)
    assert lm.batch_size == harness.AUTO_BATCH_SIZE
    tokenizer = lm.tokenizer
    pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("KING: my", "lord")]
    expected = tokenizer("")["input_ids"] + pieces[0] + [tokenizer.eos_token_id] + pieces[1]
    assert lm.tok_encode("KING: my\nlord") == expected  # XGLM's convention: a newline is `</s>`


def test_rolling_windows_are_the_harness_windows():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from glmkit.eval import rolling_windows

    for n in (1, 5, 23, 24, 25, 49, 100):
        tokens = list(range(100, 100 + n))
        for max_length in (1, 4, 24):
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_length, 1)]
            assert rolling_windows(tokens, [7], max_length) == [(list(c), list(x)) for c, x in theirs]
