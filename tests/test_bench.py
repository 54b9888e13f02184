"""Smoke tests of `glmkit bench`: every mode runs at tiny sizes and prints its ratio lines (no timing asserts)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from glmkit import bench, cli

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--repeats", "1", "--threads", str(torch.get_num_threads()), "--compile-backend", "eager"]


def test_random_weights_tiny_through_the_cli(capsys):
    args = ["bench", "--tiny", "--family", "glm", "--batch", "1", "--prompt", "4", "--new", "4", "--compile",
            "--ref-compile", "--llama-cpp", "off", *QUICK]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    for impl in ("reference", "reference compiled", "glmkit", "glmkit static", "glmkit compiled", "linears only"):
        assert f" {impl} " in out
    assert "x ref" in out and "roofline" in out
    assert "# read bandwidth (torch.sum over" in out and "the roofline uses the best" in out


def test_engine_modes(capsys):
    args = ["--bundled", "--stream", "--lookup", "--family", "glm", "--new", "6", "--stream-lengths", "4", "8",
            "--passage-tokens", "40", *QUICK]  # fmt: skip
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    for impl in ("reference", "glmkit", "glmkit compiled"):
        assert f"glm*        1 {impl} " in out
    assert "stream per-token time ratio 8/4:" in out
    assert "lookup: prompt_lookup_num_tokens=10 vs plain greedy:" in out  # a ratio, or "not available"


def test_linears_only_runs_every_linear_of_a_step_on_one_token(monkeypatch):
    _, ours = bench.build_pair("xglm", bench.TINY_SHAPES["xglm"], torch.float32, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(bench, "linear", lambda x, w, b: calls.append((tuple(x.shape), w, b)))
    assert bench.linears_seconds(ours, 2, 3, torch.device("cpu")) > 0
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    assert any(m is ours.lm_head for m in linears) and len(calls) == 3 * len(linears)
    for (shape, weight, bias), module in zip(calls, linears * 3):
        assert shape == (2, 1, module.in_features) and weight is module.weight and bias is module.bias


def test_step_bytes_leave_out_the_embedding_table():
    ref, ours = bench.build_pair("glm", bench.TINY_SHAPES["glm"], torch.float32, torch.device("cpu"))
    embed = ours.get_input_embeddings().weight
    weights = sum(p.numel() * 4 for p in ours.parameters())
    assert bench.step_bytes(ours, 2, 0) == weights - embed.numel() * 4 + 2 * embed.shape[1] * 4
    c = ours.config
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4  # per position, per row
    assert bench.step_bytes(ours, 2, 10) - bench.step_bytes(ours, 2, 0) == 2 * 10 * kv


def test_gguf_converter_is_found_in_an_unpacked_sdist(tmp_path, monkeypatch):
    script = tmp_path / "llama_cpp_python-0.3.0" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    script.parent.mkdir(parents=True)
    script.write_text("")
    assert bench.find_gguf_converter(str(script.parents[2])) == script
    assert bench.find_gguf_converter(str(script)) == script
    monkeypatch.chdir(tmp_path)  # an unpacked sdist in the working directory is found without being named
    monkeypatch.delenv("LLAMA_CPP_SRC", raising=False)
    assert bench.find_gguf_converter(None) == Path("llama_cpp_python-0.3.0/vendor/llama.cpp/convert_hf_to_gguf.py")


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("GLMKIT_GPU_SCRIPT")), reason="run by gpu.sh itself")
def test_gpu_script_dry_run(tmp_path):
    """benchmarks/gpu.sh --dry-run: the GPU session's steps on CPU at tiny shapes (~40 s on 2 quiet cores)."""
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.Popen(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=400)
    finally:  # the steps themselves are bounded by the script's own timeouts
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert out.count("glmkit compiled") >= 5
    assert "skipped" in out  # the CUDA tests were collected (and skip without CUDA)
    assert list(tmp_path.glob("gpu-bench-*.log"))


def test_bigram_continuations_tell_copying_the_prompt_from_repeating_itself():
    assert bench.bigram_continuations([1, 2, 3, 1], [2, 3, 5, 2, 3]) == (3 / 5, 3 / 5)  # (1,2) (2,3) (2,3)
    assert bench.bigram_continuations([1, 2, 3, 1], [7, 8, 7, 8]) == (0.0, 1 / 4)  # only its own (7, 8) again


def test_verbatim_share_compares_text_not_token_ids():
    from glmkit import AutoTokenizer, bundled

    tok = AutoTokenizer.from_pretrained(bundled.path("glm"))
    passage = tok("First Citizen: speak, speak.", add_special_tokens=False)["input_ids"]
    by_char = [i for ch in "First Citizen:" for i in tok(ch, add_special_tokens=False)["input_ids"]]
    assert by_char != passage[: len(by_char)]  # the same text, other tokens
    assert bench.verbatim_share(tok, by_char, passage) == 1.0
    assert bench.verbatim_share(tok, tok("First Senator:", add_special_tokens=False)["input_ids"], passage) == 6 / 14
