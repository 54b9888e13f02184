"""`glmkit perplexity` on the bundled GLM model and a slice of Tiny Shakespeare, against a direct forward."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO

from glmkit import AutoModelForCausalLM, AutoTokenizer
from glmkit.cli import main


@pytest.fixture(scope="module")
def bundled():
    return AutoModelForCausalLM.from_pretrained("default:glm"), AutoTokenizer.from_pretrained("default:glm")


def direct_nll(model, ids: list[int], start: int, end: int, context_from: int) -> float:
    """Negative log-likelihood of ids[start:end] given ids[context_from:start], from one full forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[context_from:end]])).logits[0].double(), -1)
    targets = torch.tensor(ids[start:end])
    return -float(logprobs[start - context_from - 1 : end - context_from - 1].gather(-1, targets[:, None]).sum())


def run_json(capsys, *args: str) -> dict:
    assert main(["perplexity", "default:glm", *args, "--json"]) == 0
    captured = capsys.readouterr()
    assert "windows:" in captured.err  # the progress bar
    return json.loads(captured.out)


def test_perplexity_command_equals_a_direct_computation(bundled, tmp_path, capsys):
    model, tokenizer = bundled
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:600]
    data = tmp_path / "slice.txt"
    data.write_text(text)
    prefix = tokenizer("")["input_ids"]  # [gMASK]<sop>: what the first token is predicted from
    ids = prefix + tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) - len(prefix)
    whole = run_json(capsys, "--data", str(data))  # fits the model's context: one window
    assert whole["tokens"] == n and whole["bytes"] == len(text.encode())
    assert whole["perplexity"] == pytest.approx(math.exp(direct_nll(model, ids, len(prefix), len(ids), 0) / n),
                                                rel=1e-4)  # fmt: skip
    # windows of 64 inputs advancing 32 tokens: each token scored once, with up to 64 tokens of context
    strided = run_json(capsys, "--data", str(data), "--max-length", "64", "--stride", "32")
    first = 64 + 1 - len(prefix)
    nll = direct_nll(model, ids, len(prefix), len(prefix) + first, 0)
    for start in range(len(prefix) + first, len(ids), 32):
        end = min(start + 32, len(ids))
        nll += direct_nll(model, ids, start, end, max(len(prefix), end - 65))
    assert strided["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert strided["perplexity"] != pytest.approx(whole["perplexity"], rel=1e-3)


def test_perplexity_command_reports_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["perplexity", "default:glm", "--data", str(empty)]) == 1
    assert "is empty" in capsys.readouterr().err
    assert main(["perplexity", "default:glm", "--data", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt" in capsys.readouterr().err
    data = tmp_path / "t.txt"
    data.write_text("ROMEO: hello")
    assert main(["perplexity", "default:glm", "--data", str(data), "--max-length", "8", "--stride", "9"]) == 1
    assert "stride" in capsys.readouterr().err
