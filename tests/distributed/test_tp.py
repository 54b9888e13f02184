"""Tensor parallelism on real gloo process groups (world sizes 2 and 4, launched by torchrun from here):
every family's logits, greedy / static / streamed generation and saved checkpoint against the
single-process model, per-rank peak memory against the shard, and the errors of misuse."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import glmkit
from glmkit.checkpoint import WeightReader
from glmkit.distributed import TensorParallelError
from tests.conftest import REPO, TINY_DECODERS, assert_close, reference_and_ours
from tests.parity.test_glm_original import write_chatglm

from .tp_worker import CHECKPOINTS, FAMILIES, NEW_TOKENS, SERVED, inputs, serve_requests

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """Tiny reference checkpoints of every family (GLM with 8 query / 2 kv heads: at world size 4 each kv
    head is replicated on two ranks; the same GLM in the original THUDM layout too), a 3-head XGLM that
    cannot be split, and a ~90 MB GLM for memory."""
    root = tmp_path_factory.mktemp("tp_checkpoints")
    for family in FAMILIES:
        ref, _ = reference_and_ours(family, root / family)
        if family == "glm":
            write_chatglm(ref, root / "glm_original")
    glmkit.XGLMForCausalLM(glmkit.XGLMConfig(**{**TINY_DECODERS["xglm"][3], "attention_heads": 3},
                                             vocab_size=96)).save_pretrained(root / "xglm_3_heads")  # fmt: skip
    big = dict(TINY_DECODERS["glm"][3], vocab_size=16384, hidden_size=512, intermediate_size=2048, head_dim=64)
    with torch.device("meta"):
        model = glmkit.GlmForCausalLM(glmkit.GlmConfig(**big))
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(root / "big")
    return root


def launch(world: int, checkpoints: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(WORKER), str(checkpoints), str(out), *extra]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module", params=[2, 4])
def run(request, checkpoints, tmp_path_factory) -> tuple[int, Path]:
    """One torchrun launch per world size running every check of tp_worker.py."""
    world, out = request.param, tmp_path_factory.mktemp(f"tp_world{request.param}")
    launch(world, checkpoints, out)
    return world, out


def single(directory: Path) -> glmkit.PreTrainedModel:
    return glmkit.AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("family", CHECKPOINTS)
def test_logits_and_generation_equal_the_single_process_model(run, checkpoints, family):
    world, out = run
    model = single(checkpoints / family)
    ids, mask = inputs()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for rank in range(world):
        got = load_file(out / f"{family}.rank{rank}.safetensors")
        assert_close(got["logits"], expected, rtol=1e-5, what=f"{family} world {world} rank {rank} logits")
        assert torch.equal(got["greedy"], greedy), (family, world, rank)
        assert torch.equal(got["static"], greedy), (family, world, rank)
        # the stream stops at the row's EOS, where generate pads
        assert torch.equal(got["stream"], greedy[0, ids.shape[1] : ids.shape[1] + len(got["stream"])])


@pytest.mark.parametrize("family", CHECKPOINTS)
def test_sampling_picks_the_same_tokens_on_every_rank(run, family):
    """Loading seeds every rank's RNG alike: a sampled generation (which no rank could finish alone if
    they drew differently: EOS would end them at different steps) is the same everywhere."""
    world, out = run
    sampled = [load_file(out / f"{family}.rank{rank}.safetensors")["sampled"] for rank in range(world)]
    assert all(torch.equal(s, sampled[0]) for s in sampled)


@pytest.mark.parametrize("family", CHECKPOINTS)
def test_save_from_tensor_parallel_writes_the_whole_checkpoint(run, checkpoints, family):
    """Rank 0 writes one ordinary checkpoint: the same tensors as the one loaded, so the same logits."""
    _, out = run
    saved = single(out / f"saved_{family}").state_dict()
    original = single(checkpoints / family).state_dict()
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), name


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak")
def test_peak_memory_per_rank_is_its_shard(run, checkpoints):
    """Each rank's resident growth while loading stays near the bytes it holds (plus the reader's 4 MiB
    staging buffer), and those are about 1/world of the model's (the vocabulary shards are rounded up)."""
    world, out = run
    reader = WeightReader(checkpoints / "big")
    total = sum(math.prod(reader.shape(name)) * 4 for name in reader.keys())  # fp32
    for rank in range(world):
        report = json.loads((out / f"rank{rank}.json").read_text())["memory"]
        assert report["held"] <= 1.02 * total / world, (report, total)
        # + 8 MiB: the 4 MiB staging buffer and allocator slack (6.03 MiB seen once on a busy machine); a rank
        # that read whole tensors would exceed this by tens of MB (the model is ~2x a rank's shard at world 2)
        assert report["peak"] <= 1.1 * report["held"] + (8 << 20), (report, total)


def test_scheduler_steps_followed_by_every_rank(run):
    """Rank 0's scheduler (greedy, seeded sampling, a stop string, a request waiting for a row) gives the
    tokens a single-process scheduler gives, while the other ranks follow its broadcast steps."""
    _, out = run
    expected = serve_requests(glmkit.AutoModelForCausalLM.from_pretrained(SERVED),
                              glmkit.AutoTokenizer.from_pretrained(SERVED))  # fmt: skip
    assert json.loads((out / "served.json").read_text()) == expected


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_serve_answers_from_rank_zero(tmp_path):
    """`torchrun --nproc-per-node 2 -m glmkit serve`: rank 0 answers over HTTP what one process generates."""
    pytest.importorskip("uvicorn")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "glmkit",
           "serve", "--model", SERVED, "--port", str(port)]  # fmt: skip
    with open(tmp_path / "log", "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        body = json.dumps({"model": SERVED, "prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}).encode()
        answer = None
        for _ in range(240):  # up to two minutes for both ranks to load
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                                 {"Content-Type": "application/json"})  # fmt: skip
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, (tmp_path / "log").read_text()[-4000:]
                time.sleep(0.5)
        assert answer is not None, (tmp_path / "log").read_text()[-4000:]
    finally:
        server.terminate()
        server.wait(30)
    model, tokenizer = glmkit.AutoModelForCausalLM.from_pretrained(SERVED), glmkit.AutoTokenizer.from_pretrained(SERVED)
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :],
                                skip_special_tokens=True)  # fmt: skip
    assert answer["choices"][0]["text"] == expected


def test_misuse_raises_clear_errors_on_every_rank(run):
    world, out = run
    for rank in range(world):
        found = json.loads((out / f"rank{rank}.json").read_text())["errors"]
        assert found["heads"].startswith("TensorParallelError") and "attention_heads (3)" in found["heads"]
        assert found["device_map"].startswith("TensorParallelError") and "device_map" in found["device_map"]
        assert found["tp_size"].startswith("TensorParallelError") and f"tp_size={world + 1}" in found["tp_size"]
        assert "quantization and tensor parallelism" in found["quantization"]


def test_no_process_group_and_no_torchrun_environment(checkpoints, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TensorParallelError, match="torchrun"):
        glmkit.GlmForCausalLM.from_pretrained(checkpoints / "glm", tp_plan="auto")


def test_unknown_tp_plan(checkpoints):
    with pytest.raises(ValueError, match="tp_plan must be 'auto'"):
        glmkit.GlmForCausalLM.from_pretrained(checkpoints / "glm", tp_plan="colwise")


@pytest.mark.slow  # a minute of inductor compilation per rank on 2 CPU cores
def test_compiled_step_traces_the_collectives(checkpoints, tmp_path):
    """generate(compile=True) at world size 2 compiles (no eager fallback) and picks the eager tokens."""
    launch(2, checkpoints, tmp_path, "compiled")
    model = single(checkpoints / "glm")
    ids, mask = inputs()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    for rank in range(2):
        caught = json.loads((tmp_path / f"compiled.rank{rank}.json").read_text())
        assert not [w for w in caught if "eagerly" in w], caught
        assert torch.equal(load_file(tmp_path / f"compiled.rank{rank}.safetensors")["compiled"], greedy)
