"""Tensor-parallel serving: rank 0 runs the HTTP server and its scheduler; every other rank runs the same
scheduler loop on the same inputs, which rank 0 broadcasts before each step (the requests admitted, the
ones cancelled, whether to stop). Sampling, stop strings and batching are deterministic given those and
each request's seed, so every rank takes the same steps and their collectives line up."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
import torch.distributed as dist

from ..serve.scheduler import Request, SamplingParams, Scheduler


class StepSync:
    """`Scheduler.sync` for a tensor-parallel model: the leader broadcasts its step inputs as JSON (never
    a pickle), a follower decodes them into sequences of its own (their events go nowhere)."""

    def __init__(self, model: Any, leader: bool):
        self.group, self.leader = model.tp_group, leader
        self.src = dist.get_global_rank(self.group, 0)
        self.device = model.device

    def __call__(self, scheduler: Scheduler, stopping: bool, admitted: list, cancelled: set[str]) -> tuple:
        if self.leader:
            self._broadcast(json.dumps({"stop": stopping, "cancel": sorted(cancelled),
                                        "admit": [_encode(seq) for seq in admitted]}).encode())  # fmt: skip
            return stopping, admitted, cancelled
        step = json.loads(self._broadcast(None))
        return step["stop"], [_decode(scheduler, item) for item in step["admit"]], set(step["cancel"])

    def _broadcast(self, data: bytes | None) -> bytes:
        size = torch.tensor([len(data) if data is not None else 0], device=self.device)
        dist.broadcast(size, self.src, group=self.group)
        if data is not None:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buffer = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, self.src, group=self.group)
        return bytes(buffer.cpu().numpy())


def _encode(seq: Any) -> dict:
    request = seq.request
    return {"id": request.request_id, "prompt": request.prompt_ids, "params": dataclasses.asdict(request.params),
            "seed": seq.generator.initial_seed()}  # fmt: skip


def _decode(scheduler: Scheduler, item: dict) -> Any:
    params = dict(item["params"])
    params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}  # JSON keys are strings
    params = SamplingParams(**params)
    request = Request(item["prompt"], params, lambda event: None, item["id"])
    seq = scheduler._sequence(request, scheduler._constraint(params.grammar))
    seq.generator.manual_seed(item["seed"])
    return seq


def lead(scheduler: Scheduler) -> None:
    """Make rank 0's scheduler broadcast its steps (call before `start`)."""
    scheduler.sync = StepSync(scheduler.model, leader=True)


def follow(scheduler: Scheduler) -> None:
    """Run a non-zero rank's scheduler on rank 0's steps until rank 0 stops (blocks)."""
    scheduler.sync = StepSync(scheduler.model, leader=False)
    scheduler._loop()
