"""Multi-process training under torchrun (2 processes, gloo on CPU, spawned by the test): DDP and FSDP2 step
like one process with the same global batch, and an FSDP2 run resumed from its checkpoint continues it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from glmkit import bundled
from glmkit.train import TrainOptions, train

pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

BASE = bundled.path("persimmon")
OPTS = dict(model=str(BASE), block_size=32, batch_size=4, grad_accum=2, log_every=1, eval_fraction=0.0, warmup_steps=2)

# Runs train() under torchrun; with SNAPSHOT set, copies the checkpoint saved at that step aside (an interruption)
SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys
    import glmkit.train as train_mod

    save, snapshot = train_mod.save_checkpoint, os.environ.get("SNAPSHOT")

    def save_and_snapshot(out, model, tokenizer, state):
        save(out, model, tokenizer, state)
        if snapshot and state["step"] == int(os.environ["SNAPSHOT_STEP"]):
            shutil.copytree(out, snapshot)

    train_mod.save_checkpoint = save_and_snapshot
    result = train_mod.train(train_mod.TrainOptions(**json.loads(sys.argv[1])))
    if os.environ["RANK"] == "0":
        print("HISTORY", json.dumps(result.history))
""")


def _torchrun(tmp_path: Path, options: dict, env: dict | None = None) -> list[dict]:
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               json.dumps(options)]  # fmt: skip
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("HISTORY "))
    return json.loads(line.removeprefix("HISTORY "))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _assert_same_training(a: dict, b: dict, base: dict, what: str) -> None:
    """Equal up to float reduction order: the difference is a tiny fraction of what training changed."""
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    update = torch.cat([(a[k] - base[k]).flatten() for k in a]).norm()
    assert update > 0 and diff <= 1e-3 * update, f"{what}: |difference| {diff:.3g} vs |update| {update:.3g}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text((REPO / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    return train(TrainOptions(data=corpus, out=out, max_steps=4, **OPTS))


def test_ddp_steps_like_one_process(corpus, one_process, tmp_path):
    out = tmp_path / "ddp"
    history = _torchrun(tmp_path, dict(OPTS, data=str(corpus), out=str(out), max_steps=4, parallel="ddp"))
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in one_process.history], abs=1e-5)
    _assert_same_training(_weights(out), _weights(one_process.out), _weights(BASE), "2-process DDP")


def test_fsdp_steps_like_one_process_and_resumes(corpus, one_process, tmp_path):
    """FSDP2 over 2 processes, with a checkpoint at step 2 copied aside; then a run resumed from that copy
    continues the same loss curve to the same weights."""
    snapshot, out = tmp_path / "at_step_2", tmp_path / "straight"
    options = dict(OPTS, data=str(corpus), out=str(out), max_steps=4, parallel="fsdp", save_every=2)
    straight = _torchrun(tmp_path, options, {"SNAPSHOT": str(snapshot), "SNAPSHOT_STEP": "2"})
    expected = {h["step"]: h["loss"] for h in one_process.history}
    assert [h["loss"] for h in straight] == pytest.approx([expected[s] for s in (1, 2, 3, 4)], abs=1e-5)
    _assert_same_training(_weights(out), _weights(one_process.out), _weights(BASE), "2-process FSDP2")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["PersimmonForCausalLM"]
    resumed = _torchrun(tmp_path, dict(options, out=str(snapshot), resume=True))
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["loss"] for h in resumed] == pytest.approx([expected[3], expected[4]], abs=1e-5)
    _assert_same_training(_weights(snapshot), _weights(out), _weights(BASE), "resumed FSDP2")
