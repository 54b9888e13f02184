"""`glmkit quantize IN OUT`: the written checkpoint loads with no flags and equals quantizing in memory."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from glmkit import AutoModelForCausalLM, AutoTokenizer
from glmkit.cli import main
from glmkit.quant import Int4Linear, quantize_
from tests.conftest import REPO


def test_quantize_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "glm-int4"
    assert main(["quantize", "default:glm", str(out), "--method", "int4", "--group-size", "32"]) == 0
    assert "quantized int4 (group size 32)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_type"] == "int4_weight_only" and config["group_size"] == 32
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, Int4Linear)
    expected = quantize_(AutoModelForCausalLM.from_pretrained("default:glm"), "int4", 32)
    ids = torch.tensor([[5, 17, 33, 2]])
    assert torch.equal(loaded(ids).logits, expected(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("ROMEO").input_ids == AutoTokenizer.from_pretrained("default:glm")(
        "ROMEO").input_ids  # fmt: skip


def test_quantize_command_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["quantize", "default:glm", str(out), "--method", "int8"]) == 1
    assert "is not empty" in capsys.readouterr().err and not (out / "config.json").exists()
    assert main(["quantize", "default:glm", str(out), "--method", "int8", "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    assert main(["quantize", "default:glm", str(tmp_path / "x"), "--method", "int4", "--group-size", "48"]) == 1
    assert "group_size must be one of" in capsys.readouterr().err
    assert main(["quantize", "default:glm", str(tmp_path / "y"), "--method", "int8", "--group-size", "32"]) == 1
    assert "int4 only" in capsys.readouterr().err


def test_generate_command_runs_a_quantized_checkpoint(tmp_path):
    out = tmp_path / "glm-int8"
    assert main(["quantize", "default:glm", str(out), "--method", "int8", "--dtype", "bfloat16"]) == 0
    done = subprocess.run([sys.executable, "-m", "glmkit.cli", "generate", "--model", str(out), "--max-new-tokens",
                           "8", "ROMEO:"], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out, dtype="auto"), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0], skip_special_tokens=True)
    assert done.stdout.strip() == expected.strip()
