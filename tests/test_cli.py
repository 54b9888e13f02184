"""The real `glmkit` console script, driven in subprocesses: generate and chat."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, trainers

from glmkit import GlmConfig, GlmForCausalLM

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GLM with a letter-level BPE tokenizer and a chat template, as a checkpoint directory."""
    path = tmp_path_factory.mktemp("cli-model")
    letters = "abcdefghijklmnopqrstuvwxyz "
    gen = torch.Generator().manual_seed(0)
    text = ["".join(letters[i] for i in torch.randint(0, 27, (200,), generator=gen).tolist()) for _ in range(20)]
    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.Fuse()
    specials = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=80, special_tokens=specials, initial_alphabet=list(letters))
    )
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    config = GlmConfig(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=[1])  # fmt: skip
    GlmForCausalLM(config).save_pretrained(path)
    return path


def glmkit(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    exe = shutil.which("glmkit") or ""
    command = [exe, *args] if exe else [sys.executable, "-m", "glmkit.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=180, env=env, check=False)


def test_generate_prompts_from_args_and_stdin(checkpoint):
    result = glmkit("generate", "abc", "--model", str(checkpoint), "--max-new-tokens", "6", "--stream")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("abc") and "tokens/s" in result.stderr
    piped = glmkit("generate", "--model", str(checkpoint), "--max-new-tokens", "4", "--do-sample", "--seed", "1",
                   "--chat", stdin="hello\nworld\n")  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr.count("tokens/s") == 2


def test_chat_loop_commands(checkpoint):
    script = "hello\n/reset\n/system be brief\nhi there\n/quit\n"
    result = glmkit("chat", "--model", str(checkpoint), "--max-new-tokens", "4", stdin=script)
    assert result.returncode == 0, result.stderr
    assert "(history cleared)" in result.stdout and "(system prompt set; history cleared)" in result.stdout


def test_bad_model_is_one_line_error(tmp_path):
    result = glmkit("generate", "x", "--model", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.startswith("glmkit generate: error:") and "Traceback" not in result.stderr


def test_train_then_generate(tmp_path):
    """A 20-step run from scratch lowers the loss; its output loads back and generates."""
    import re

    text = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog number {i % 7}." for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    out = tmp_path / "run"
    result = glmkit("train", "--data", str(tmp_path / "corpus.txt"), "--family", "glm", "--out", str(out),
                    "--max-steps", "20", "--vocab-size", "300", "--block-size", "32", "--batch-size", "8",
                    "--eval-every", "10", "--log-every", "5", "--warmup-steps", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, last = map(float, re.search(r"train loss ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert last < first
    generated = glmkit("generate", "Line 3:", "--model", str(out), "--max-new-tokens", "8")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Line 3:")


def test_generate_bundled_default():
    """`glmkit generate` with no --model runs offline on the bundled GLM."""
    result = glmkit("generate", "ROMEO:", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout.strip()) > len("ROMEO:")


def test_chat_ctrl_c_stops_the_reply_keeps_it_and_continues(checkpoint, monkeypatch, capsys):
    """Ctrl-C during a reply prints [stopped], keeps the partial reply in the history, and the loop goes on;
    Ctrl-C at the prompt quits cleanly. (In-process: the interrupt is raised by the stream.)"""
    import io

    from glmkit.cli import main
    from glmkit.generation.utils import GenerationMixin

    real_stream = GenerationMixin.stream
    calls, prompts, partial = [], [], []

    def stream(self, input_ids, *args, **kwargs):
        calls.append(input_ids)
        for i, chunk in enumerate(real_stream(self, input_ids, *args, **kwargs)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt  # the user presses Ctrl-C during the first reply
            if len(calls) == 1:
                partial.append(chunk.text[0])
            yield chunk

    lines = iter(["hello", "again"])

    def fake_input(prompt=""):
        prompts.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt

    monkeypatch.setattr(GenerationMixin, "stream", stream)
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr("sys.stdin", io.StringIO())
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("[stopped]") == 1 and len(calls) == 2 and len(prompts) == 3
    from glmkit import AutoTokenizer

    second = AutoTokenizer.from_pretrained(checkpoint).decode(calls[1][0])
    reply = "".join(partial).strip()
    assert reply and f"<|assistant|>{reply}<|user|>again" in second  # the partial reply is in the history
