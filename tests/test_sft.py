"""Supervised fine-tuning: label masks against the chat template's own rendering (through transformers'
tokenizer), prompt/completion rows, rendering errors naming the line, and LoRA / QLoRA runs of `glmkit train`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_close

import glmkit.train as train_mod
from glmkit import AutoModelForCausalLM, AutoTokenizer, bundled, lora
from glmkit.cli import main
from glmkit.sft import (
    IGNORE,
    Completion,
    Conversation,
    ExampleData,
    encode_completion,
    encode_conversation,
    encode_examples,
)
from glmkit.train import STATE_FILE, TrainOptions, read_records, train

transformers = pytest.importorskip("transformers")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who speaks first in Romeo and Juliet?"},
    {"role": "assistant", "content": "Sampson, a servant of the Capulets."},
    {"role": "user", "content": "And the weather in Verona?"},
    {"role": "assistant", "content": "Sunny, as in the second act."},
]


def _expected_labels(ref_tok, messages: list[dict], tools: list | None) -> tuple[list[int], list[int]]:
    """The reference tokenizer's own rendering: an assistant turn spans from the end of the prefix rendered with
    the generation prompt to the end of the rendering through that turn."""
    render = lambda msgs, gen: ref_tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=True)
    ids = render(messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
            assert ids[:end] == render(messages[: i + 1], False)  # the template renders by prefixes
            labels[start:end] = ids[start:end]
    return ids, labels


@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]])
@pytest.mark.parametrize("family", ["glm", "persimmon"])
def test_assistant_tokens_are_the_only_labels(family, tools):
    directory = bundled.path(family)
    tok, ref_tok = AutoTokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(directory)
    ids, labels = encode_conversation(Conversation(CONVERSATION, tools, "x.jsonl:1"), tok)
    want_ids, want_labels = _expected_labels(ref_tok, CONVERSATION, tools)
    eos = tok.eos_token_id
    assert ids == want_ids + [eos] and labels == want_labels + [eos]  # EOS ends the last turn: learnt
    learnt = tok.decode([t for t in labels if t != IGNORE], skip_special_tokens=True)
    assert "Sampson, a servant of the Capulets." in learnt and "Sunny, as in the second act." in learnt
    assert "Romeo" not in learnt and "briefly" not in learnt and "get_weather" not in learnt


def test_conversation_ending_with_a_user_turn_learns_no_eos():
    tok = AutoTokenizer.from_pretrained(bundled.path("glm"))
    ids, labels = encode_conversation(Conversation(CONVERSATION[:4], None, "x:1"), tok)
    assert ids[-1] == tok.eos_token_id and labels[-1] == IGNORE


def test_prompt_completion_rows():
    tok = AutoTokenizer.from_pretrained(bundled.path("glm"))
    prompt, completion = "ROMEO: What light", " through yonder window breaks?"
    ids, labels = encode_completion(Completion(prompt, completion, "x:1"), tok)
    n_prompt = len(tok(prompt)["input_ids"])
    assert ids[:n_prompt] == tok(prompt)["input_ids"] and labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == completion


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_rendering_failure_names_the_line(tmp_path):
    tok = AutoTokenizer.from_pretrained(bundled.path("glm"))
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}"
                         "{% endif %}{{ m.content }}{% endfor %}")  # fmt: skip
    rows = [{"messages": CONVERSATION[1:3]}, {"prompt": "a", "completion": "b"}, {"messages": CONVERSATION}]
    records = read_records(_write_jsonl(tmp_path / "chat.jsonl", rows))
    with pytest.raises(ValueError, match=r"chat\.jsonl:3: the chat template could not render.*no system turns"):
        encode_examples(records, tok, 64)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION}, {"messages": [], "tools": 3}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected"):
        read_records(bad)


# ---- training runs ------------------------------------------------------------------------------------


def _dialogues(n: int, seed: int = 0) -> list[dict]:
    """Synthetic dialogues whose answers follow from the question (learnable by a tiny model)."""
    names = ["ROMEO", "JULIET", "MERCUTIO", "TYBALT", "NURSE", "FRIAR"]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (names[int(i)] for i in torch.randint(len(names), (2,), generator=gen))
        question, answer = f"Who answers {a}?", f"{b} answers {a}, and {a} is silent."
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


FAST = dict(block_size=64, batch_size=8, log_every=2, eval_every=6, warmup_steps=2, lr=3e-3, eval_fraction=0.2)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("sft") / "chat.jsonl", _dialogues(60))


def test_lora_run_saves_an_adapter_and_lowers_the_loss(chat_data, tmp_path):
    base = bundled.path("glm")
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    result = train(TrainOptions(data=chat_data, out=tmp_path / "run", model=base, lora=True, rank=8, alpha=16,
                                target_modules="q_proj,v_proj,down_proj", max_steps=6, **FAST))  # fmt: skip
    files = {f.name for f in result.out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", STATE_FILE, "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0]
    metrics = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6] and all(m["tokens_per_s"] > 0 for m in metrics
                                                                             if "loss" in m)  # fmt: skip
    tuned = AutoModelForCausalLM.from_pretrained(base, adapter=result.out)
    assert set(lora.lora_modules(tuned)) == {
        f"model.layers.{i}.{m}"
        for i in range(tuned.config.num_hidden_layers)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    base_after = {k.replace(".base_layer", ""): v for k, v in tuned.state_dict().items() if ".lora_" not in k}
    assert base_after.keys() == before.keys() and all(torch.equal(before[k], base_after[k]) for k in before)
    # the reported eval loss is the adapter's: recompute it independently (transformers' loss, masked labels)
    tok = AutoTokenizer.from_pretrained(base)
    examples, _ = encode_examples(read_records(chat_data), tok, 64)
    held_out = examples[-12:]
    lora.merge(tuned).save_pretrained(tmp_path / "merged")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    total = count = 0
    for ids, labels in held_out:
        n = sum(label != IGNORE for label in labels[1:])
        with torch.no_grad():
            total += float(ref(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss) * n
        count += n
    assert abs(total / count - result.eval_loss) < 1e-4


def test_qlora_run_on_an_int8_base(chat_data, tmp_path):
    opts = dict(FAST, model=bundled.path("glm"), lora=True, quantization="int8", max_steps=3, log_every=1)
    result = train(TrainOptions(data=chat_data, out=tmp_path / "q", **dict(opts, eval_fraction=0.05)))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0]
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["target_modules"] == "all-linear" and config["r"] == 8


def test_lora_resume_matches_an_uninterrupted_run(chat_data, tmp_path, monkeypatch):
    snapshot = tmp_path / "at_step_2"
    save = train_mod.save_checkpoint

    def save_and_snapshot(out, model, tokenizer, state):
        save(out, model, tokenizer, state)
        if state["step"] == 2:
            shutil.copytree(out, snapshot)

    monkeypatch.setattr(train_mod, "save_checkpoint", save_and_snapshot)
    opts = dict(FAST, model=bundled.path("glm"), lora=True, dropout=0.1, max_steps=4, save_every=2, eval_fraction=0.0)
    straight = train(TrainOptions(data=chat_data, out=tmp_path / "straight", **opts))
    resumed = train(TrainOptions(data=chat_data, out=snapshot, resume=True, **opts))
    assert resumed.step == 4 and [h["step"] for h in resumed.history] == [4]
    assert resumed.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], abs=1e-6)
    a, b = lora.read_adapter(straight.out)[1], lora.read_adapter(resumed.out)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_lora_and_its_errors(chat_data, tmp_path, capsys):
    base = str(bundled.path("glm"))
    argv = ["train", "--data", str(chat_data), "--out", str(tmp_path / "cli"), "--model", base, "--lora",
            "--rank", "4", "--target-modules", "q_proj,v_proj", "--max-steps", "1", "--block-size", "64"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((tmp_path / "cli" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert main(["merge", base, str(tmp_path / "cli"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    capsys.readouterr()
    bad = argv[:4] + [str(tmp_path / "bad")] + argv[5:10] + ["--target-modules", "q_proj,qkv"]
    assert main(bad) == 1
    assert "qkv match no linear layer of GlmForCausalLM" in capsys.readouterr().err
    assert main(["train", "--data", str(chat_data), "--out", str(tmp_path / "x"), "--lora"]) == 1
    assert "pass model" in capsys.readouterr().err


# ---- padding-free packing -----------------------------------------------------------------------------


def test_packed_loss_equals_unpacked(chat_data):
    """The batch's examples end to end in one row (positions restarting per example) give the padded batch's
    loss and gradients: no attention across examples, no prediction across a boundary."""
    model = AutoModelForCausalLM.from_pretrained(bundled.path("glm"))
    tok = AutoTokenizer.from_pretrained(bundled.path("glm"))
    rows = [{"prompt": "ROMEO:", "completion": " But soft, what light"}, *_dialogues(3)]
    examples, _ = encode_examples(read_records(_write_jsonl(chat_data.parent / "mixed.jsonl", rows)), tok, 64)
    assert len({len(ids) for ids, _ in examples}) > 1  # the padded batch does pad
    indices = list(range(len(examples)))
    results = []
    for packed in (False, True):
        data = ExampleData(examples, tok.pad_token_id, packed=packed)
        batch = data.batch(indices)
        assert batch["input_ids"].shape[0] == (1 if packed else len(examples))
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=data.targets(indices)).loss
        loss.backward()
        results.append((loss.detach(), model.model.embed_tokens.weight.grad.clone()))
    (loss_padded, grad_padded), (loss_packed, grad_packed) = results
    assert_close(loss_packed, loss_padded, rtol=1e-5, what="packed loss")
    assert_close(grad_packed, grad_padded, rtol=1e-4, what="packed gradient")
    crossing = {k: v for k, v in batch.items() if k != "position_ids"}  # one long document: attends across examples
    with torch.no_grad():
        assert abs(float(model(**crossing, num_items_in_batch=data.targets(indices)).loss) - float(loss_packed)) > 1e-3


def test_packed_run_matches_padded_run(chat_data, tmp_path):
    opts = dict(FAST, model=bundled.path("glm"), lora=True, max_steps=3, eval_fraction=0.1)
    padded = train(TrainOptions(data=chat_data, out=tmp_path / "padded", **opts))
    packed = train(TrainOptions(data=chat_data, out=tmp_path / "packed", packing=True, **opts))
    assert [h["loss"] for h in packed.history if "loss" in h] == pytest.approx(
        [h["loss"] for h in padded.history if "loss" in h], abs=1e-5
    )
    assert packed.eval_loss == pytest.approx(padded.eval_loss, abs=1e-5)
