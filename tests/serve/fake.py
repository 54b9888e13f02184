"""A stand-in for glmkit.serve.scheduler.Scheduler with the same interface: tokens come from a formula
instead of a model, one per request per step, on the scheduler's own thread (so the app's cross-thread
event bridge is exercised as with the real one)."""

from __future__ import annotations

import random
import threading

from glmkit.serve.scheduler import Event, QueueFull, Request, RequestError

FIRST, SPAN = 300, 1500  # generated ids lie in [FIRST, FIRST + SPAN): plain tokens of the bundled vocabulary


def fake_tokens(prompt_ids: list[int], seed: int | None, temperature: float, count: int) -> list[int]:
    """What FakeScheduler generates: a function of the prompt (and the seed, when sampling)."""
    if temperature == 0:
        rng = random.Random(sum(prompt_ids))
    else:
        rng = random.Random(None if seed is None else f"{sum(prompt_ids)}-{seed}")
    return [FIRST + rng.randrange(SPAN) for _ in range(count)]


class FakeScheduler:
    """submit / cancel / start / stop / stats like Scheduler. `hold()` stops the steps (requests wait where
    they are), `release()` resumes them, and `hold_after = k` holds once a request has k tokens; `submitted`
    and `cancelled` record what the app did."""

    def __init__(self, tokenizer, max_queue_len: int = 64):
        self.tokenizer, self.max_queue_len = tokenizer, max_queue_len
        self.submitted: list[Request] = []
        self.warmed = False
        self.cancelled: list[str] = []
        self.active: dict[str, tuple[Request, list[int], object]] = {}  # id -> (request, tokens, detokenizer)
        self.done: dict[str, int] = {}  # id -> tokens emitted so far
        self._cond = threading.Condition()
        self._go = True
        self.hold_after: int | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = 0

    def warm_up(self) -> None:
        assert self._thread is None, "warm_up runs before the scheduler starts"
        self.warmed = True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fake-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for request, _, _ in list(self.active.values()):
            request.on_event(Event(request.request_id, [], "", finish_reason="abort"))
        self.active.clear()

    def hold(self) -> None:
        with self._cond:
            self._go = False

    def release(self) -> None:
        with self._cond:
            self._go = True
            self._cond.notify_all()

    def submit(self, request: Request) -> str:
        if not request.prompt_ids:
            raise RequestError("empty prompt")
        if request.params.max_tokens <= 0:
            raise RequestError("max_tokens must be positive")
        with self._cond:
            if len(self.active) >= self.max_queue_len:
                raise QueueFull(f"{len(self.active)} requests waiting")
            if not request.request_id:
                self._ids += 1
                request.request_id = f"fake-{self._ids}"
            p = request.params
            tokens = fake_tokens(request.prompt_ids, p.seed, p.temperature, p.max_tokens)
            detok = self.tokenizer.streaming_detokenizer(skip_special_tokens=True, prefix_ids=request.prompt_ids[-1:])
            self.submitted.append(request)
            self.active[request.request_id] = (request, tokens, detok)
            self.done[request.request_id] = 0
            self._cond.notify_all()
        return request.request_id

    def cancel(self, request_id: str) -> None:
        with self._cond:
            if request_id in self.active:
                self.cancelled.append(request_id)
                request = self.active.pop(request_id)[0]
                request.on_event(Event(request_id, [], "", finish_reason="abort"))

    def stats(self) -> dict[str, float]:
        with self._cond:
            return {"running": float(len(self.active)), "waiting": 0.0, "kv_cache_usage": 0.0,
                    "prompt_tokens_total": 0.0, "generation_tokens_total": 0.0}  # fmt: skip

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or (self._go and self.active))
                if self._stopping:
                    return
                for request_id in list(self.active):
                    self._step(request_id)

    def _step(self, request_id: str) -> None:
        request, tokens, detok = self.active[request_id]
        count = self.done[request_id]
        token = tokens[count]
        self.done[request_id] = count + 1
        p = request.params
        finish = None
        if token in p.stop_token_ids:
            finish, ids, text = "stop", [], detok.finalize()
        else:
            ids, text = [token], detok.add(token)
            if count + 1 == p.max_tokens:
                finish, text = "length", text + detok.finalize()
        logprobs = None
        if p.logprobs is not None and ids:
            top = [(token, -0.25), (token + 1, -1.5), (token + 2, -2.5)][: p.logprobs]
            logprobs = [{"id": token, "logprob": -0.25, "top": top}]
        event = Event(request_id, ids, text, finish_reason=finish, logprobs=logprobs,
                      prompt_tokens=len(request.prompt_ids), completion_tokens=count + len(ids))  # fmt: skip
        if finish is not None:
            del self.active[request_id]
        if count + 1 == self.hold_after:
            self._go = False
        request.on_event(event)
