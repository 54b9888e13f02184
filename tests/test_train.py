"""glmkit.train: from-scratch runs per family, chat fine-tuning, exact resume, data errors; the bundled models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_close

import glmkit.train as train_mod
from glmkit import AutoModelForCausalLM, AutoTokenizer, bundled
from glmkit.train import FAMILIES, STATE_FILE, TrainOptions, train

SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
FAST = dict(preset="tiny", vocab_size=384, block_size=32, batch_size=8, log_every=5, eval_every=10, warmup_steps=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def glm_run(corpus, tmp_path_factory) -> train_mod.TrainResult:
    out = tmp_path_factory.mktemp("runs") / "glm"
    return train(TrainOptions(data=corpus, out=out, family="glm", max_steps=20, **FAST))


def _generate(directory: Path, prompt: str = "ROMEO:") -> str:
    model, tok = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    return tok.decode(out[0], skip_special_tokens=True)


def test_scratch_run_lowers_loss_and_loads(glm_run):
    losses = [h["loss"] for h in glm_run.history if "loss" in h]
    assert glm_run.step == 20 and losses[-1] < losses[0] - 0.5
    assert glm_run.eval_loss is not None and glm_run.eval_loss < math.log(384)
    assert not (glm_run.out / ".partial").exists()
    tok = AutoTokenizer.from_pretrained(glm_run.out)
    assert tok("ROMEO")["input_ids"][:2] == tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    assert _generate(glm_run.out).startswith("ROMEO:")


@pytest.mark.parametrize("family", ["xglm", "persimmon"])
def test_scratch_run_other_families(corpus, tmp_path, family):
    result = train(TrainOptions(data=corpus, out=tmp_path / family, family=family, max_steps=6, **FAST))
    config = json.loads((result.out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(result.out)
    assert config["model_type"] == family and config["vocab_size"] == len(tok)
    vocab_file = {"xglm": "sentencepiece.bpe.model", "persimmon": "tokenizer.model"}[family]
    assert (result.out / vocab_file).is_file() and not (result.out / "tokenizer.json").exists()
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    _generate(result.out)


def test_chat_finetune(glm_run, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Who speaks in scene {i}?"},
                      {"role": "assistant", "content": f"ROMEO speaks in scene {i}, and JULIET answers."}]}
        for i in range(40)
    ]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    opts = dict(FAST, max_steps=4, eval_every=4)
    result = train(TrainOptions(data=data, out=tmp_path / "ft", model=glm_run.out, **opts))
    assert result.step == 4 and result.eval_loss is not None
    tok = AutoTokenizer.from_pretrained(result.out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who?"}], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("[gMASK]<sop><|user|>")
    _generate(result.out)


def test_resume_matches_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    """Stop-and-resume at step 3 of 6 ends with exactly the weights of the straight run."""
    snapshot = tmp_path / "at_step_3"
    save = train_mod.save_checkpoint

    def save_and_snapshot(out, model, tokenizer, state):
        save(out, model, tokenizer, state)
        if state["step"] == 3:
            shutil.copytree(out, snapshot)

    monkeypatch.setattr(train_mod, "save_checkpoint", save_and_snapshot)
    opts = dict(FAST, family="persimmon", max_steps=6, save_every=3, eval_fraction=0.0)
    straight = train(TrainOptions(data=corpus, out=tmp_path / "straight", **opts))
    assert torch.load(snapshot / STATE_FILE, weights_only=True)["step"] == 3
    resumed = train(TrainOptions(data=corpus, out=snapshot, resume=True, **opts))
    assert resumed.step == 6 and [h["step"] for h in resumed.history] == [5, 6]
    a = AutoModelForCausalLM.from_pretrained(straight.out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_overwrite_and_to_resume_nothing(glm_run, corpus, tmp_path):
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(TrainOptions(data=corpus, out=glm_run.out, **FAST))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TrainOptions(data=corpus, out=tmp_path / "new", resume=True, **FAST))


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "error", "match"),
    [
        ("empty.txt", "\n\n  \n", {}, ValueError, "holds no text"),
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": 3}\n', {}, ValueError, r"bad\.jsonl:3: expected"),
        ("broken.jsonl", '{"text": "ok"}\n{"text": \n', {}, ValueError, r"broken\.jsonl:2: not valid JSON"),
        ("ok.txt", "To be.", {"family": "gpt2"}, ValueError, "unknown family 'gpt2'"),
        ("ok.txt", "To be.", {"preset": "huge"}, ValueError, "unknown preset 'huge' for glm"),
        ("ok.txt", "To be.", {}, ValueError, "too little data"),
        ("ok.txt", "To be.", {"batch_size": 0}, ValueError, "batch_size must be at least 1"),
    ],
)
def test_bad_inputs(tmp_path, name, content, kwargs, error, match):
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=match):
        train(TrainOptions(data=data, out=tmp_path / "out", **{**FAST, **kwargs}))


def test_xglm_has_no_chat_template(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="chat template"):
        train(TrainOptions(data=data, out=tmp_path / "out", family="xglm", **FAST))


# ---- the bundled default models ------------------------------------------------------------------


def test_bundled_path_errors():
    with pytest.raises(ValueError, match="no bundled model for family 'gpt2'"):
        bundled.path("gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_bundled_model_matches_transformers(family):
    transformers = pytest.importorskip("transformers")
    directory = bundled.path(family)
    ours = AutoModelForCausalLM.from_pretrained(directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory)
    tok, ref_tok = AutoTokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(directory)
    text = SHAKESPEARE.read_text(encoding="utf-8")[5000:5600].strip()
    ids = tok(text)["input_ids"]
    assert ids == ref_tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text == ref_tok.decode(ids, skip_special_tokens=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, what=f"bundled {family} logits")
