"""`glmkit bench serve`: load on an OpenAI-compatible server, as vLLM's benchmark_serving measures it.

    glmkit bench serve                                  # the bundled GLM, served in-process
    glmkit bench serve --mid --compare                  # hidden 1024 x 8 layers: 32 streams vs 1 vs reference
    glmkit bench serve --url http://127.0.0.1:8000      # a server already running
    glmkit bench serve --clients 200 --check            # load check: every stream well formed, RSS kept

Requests go to /v1/completions as token-id prompts (random ids of --input-len, or the lines of
--dataset), streamed, greedy, `ignore_eos` so each makes --output-len tokens. At most --concurrency are
in flight; --request-rate spaces arrivals as a Poisson process (default: all at once). Per request: TTFT
(submission to the first text), ITL (between text chunks), TPOT ((latency - TTFT) / (tokens - 1)); the
table prints their mean and p50 / p90 / p99, and request and token throughput over the run.
--compare (in-process only) also times one stream alone and the reference's `generate` serving requests
one by one on the same weights (in --dtype), and prints the aggregate ratios; --ttft-probe times a new request's TTFT
on the idle server and while concurrency - 1 others stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

MID_SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
             "intermediate_size": 2816, "vocab_size": 32000, "max_position_embeddings": 2048,
             "pad_token_id": 0, "eos_token_id": 2}  # fmt: skip


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmkit bench serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--url", help="a running server (default: serve --model in this process)")
    parser.add_argument("--model", default="default:glm", help="checkpoint to serve in-process")
    parser.add_argument("--mid", action="store_true", help="serve a random GLM of mid shapes (hidden 1024, 8 layers)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    parser.add_argument("--clients", type=int, default=None, help="shorthand: --num-prompts N --concurrency N")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="arrivals per second (Poisson)")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dataset", help="a text file: one prompt per line (instead of random ids)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="in-process scheduler rows")
    parser.add_argument("--compare", action="store_true", help="also one stream alone and the reference, one by one")
    parser.add_argument("--ref-requests", type=int, default=4, help="--compare: requests the reference serves")
    parser.add_argument("--ttft-probe", action="store_true", help="TTFT idle vs beside concurrency - 1 streams")
    parser.add_argument("--check", action="store_true", help="fail unless every stream is well formed and complete")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations of the served model (and of --compare's reference)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the load this many times, RSS before and after each (growth in round 1 that does "
                             "not recur is first allocation, not a leak)")
    parser.add_argument("--compile", action="store_true", help="the in-process server's decode step compiled")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    return parser


# ---- the client --------------------------------------------------------------------------------------------
async def one_request(client: Any, url: str, model: str, prompt: list[int] | str, output_len: int,
                      started: asyncio.Event | None = None) -> Result:  # fmt: skip
    """One streamed completion; TTFT at its first chunk with text (or its last, if no token has any)."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    result, start, last, done = Result(), time.perf_counter(), 0.0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk["choices"] and (chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]):
                    now = time.perf_counter()
                    if started is not None:
                        started.set()
                    if last:
                        result.itl.append(now - last)
                    else:
                        result.ttft = now - start
                    last = now
    except Exception as err:  # noqa: BLE001 - a failed request is a figure, not the end of the benchmark
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = done and result.tokens == output_len
    if done and not result.ok:
        result.error = f"stream ended with {result.tokens} of {output_len} tokens"
    return result


async def run_load(url: str, model: str, prompts: list[Any], output_len: int, concurrency: int,
                   rate: float, seed: int) -> tuple[list[Result], float]:  # fmt: skip
    import httpx

    gate, rng = asyncio.Semaphore(concurrency), random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def gated(prompt: Any) -> Result:
            async with gate:
                return await one_request(client, url, model, prompt, output_len)

        start, tasks = time.perf_counter(), []
        for prompt in prompts:
            tasks.append(asyncio.create_task(gated(prompt)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def summary(results: list[Result], duration: float, label: str) -> dict[str, Any]:
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    row: dict[str, Any] = {"run": label, "requests": len(results), "failed": len(results) - len(good),
                           "duration_s": duration, "req_per_s": len(good) / duration,
                           "output_tok_per_s": tokens / duration,
                           "total_tok_per_s": (tokens + sum(r.prompt_tokens for r in good)) / duration}  # fmt: skip
    series = {"ttft_ms": [r.ttft * 1e3 for r in good], "itl_ms": [x * 1e3 for r in good for x in r.itl],
              "tpot_ms": [(r.latency - r.ttft) * 1e3 / (r.tokens - 1) for r in good if r.tokens > 1]}  # fmt: skip
    for name, values in series.items():
        if values:
            row[name] = {"mean": statistics.fmean(values), **{f"p{q}": _percentile(values, q) for q in (50, 90, 99)}}
    return row


def _percentile(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def print_summary(row: dict[str, Any]) -> None:
    print(f"## {row['run']}: {row['requests']} requests, {row['failed']} failed, {row['duration_s']:.2f} s; "
          f"{row['req_per_s']:.2f} req/s, {row['output_tok_per_s']:.1f} output tok/s, "
          f"{row['total_tok_per_s']:.1f} total tok/s")  # fmt: skip
    for name in ("ttft_ms", "tpot_ms", "itl_ms"):
        if name in row:
            s = row[name]
            print(f"   {name:8s} mean {s['mean']:8.2f}  p50 {s['p50']:8.2f}  p90 {s['p90']:8.2f}  p99 {s['p99']:8.2f}")


# ---- the in-process server ---------------------------------------------------------------------------------
@contextlib.contextmanager
def serving(model: Any, tokenizer: Any, name: str, max_num_seqs: int, queue: int,
            compile: bool = False) -> Iterator[str]:  # fmt: skip
    """A real scheduler and uvicorn server on a free local port, for the benchmark's lifetime."""
    import uvicorn

    from .app import create_app
    from .scheduler import Scheduler

    limit = getattr(model.config, "max_position_embeddings", 2048)
    scheduler = Scheduler(model, tokenizer, max_num_seqs=max_num_seqs, max_queue_len=queue, max_model_len=limit,
                          compile=compile)  # fmt: skip
    scheduler.warm_up()
    scheduler.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    app = create_app(scheduler, tokenizer, name, max_model_len=limit)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", backlog=4096))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the benchmark's server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        scheduler.stop()
        sock.close()


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(glmkit model, tokenizer, reference model or None): --mid builds both on shared random weights."""
    import glmkit

    dtype = getattr(torch, args.dtype)
    if args.mid:
        from ..bench import build_pair

        ref, model = build_pair("glm", MID_SHAPE, dtype, torch.device("cpu"))
        tokenizer = glmkit.AutoTokenizer.from_pretrained("default:glm")  # prompts are ids; text is for decode
        return model, tokenizer, ref
    model = glmkit.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).eval()
    tokenizer = glmkit.AutoTokenizer.from_pretrained(args.model)
    ref = None
    if args.compare:
        import transformers

        from .. import bundled

        source = bundled.path(args.model.split(":", 1)[1]) if args.model.startswith("default:") else args.model
        ref = transformers.AutoModelForCausalLM.from_pretrained(source, torch_dtype=dtype).eval()
    return model, tokenizer, ref


def reference_one_by_one(ref: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """The reference's generate serving requests one at a time (greedy, exactly output_len tokens)."""
    start, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for prompt in prompts:
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=output_len, min_new_tokens=output_len,
                               do_sample=False, pad_token_id=0)  # fmt: skip
            tokens += out.shape[1] - len(prompt)
    duration = time.perf_counter() - start
    return {"run": "reference generate, one by one", "requests": len(prompts), "output_tok_per_s": tokens / duration}


def make_prompts(args: argparse.Namespace, tokenizer: Any, vocab: int) -> list[Any]:
    rng = random.Random(args.seed)
    if args.dataset:
        with open(args.dataset, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if not lines:
            raise ValueError(f"--dataset {args.dataset} has no non-empty lines")
        return [lines[i % len(lines)] for i in range(args.num_prompts)]
    low = 100 if vocab > 1000 else 0  # keep clear of the special ids at the bottom of small vocabularies
    return [[rng.randrange(low, min(vocab, 30000)) for _ in range(args.input_len)] for _ in range(args.num_prompts)]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def ttft_probe(url: str, name: str, prompt: list[int], others: list[Any], output_len: int,
                     probes: int = 7, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """A request's TTFT on the idle server and while `others` stream long completions: the median of `probes`
    requests each, the busy ones sent one after another at a random moment (up to 250 ms after the previous one
    ended), so they land at any point of the running batch's decode step, as real arrivals do."""
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        idle = [(await one_request(client, url, name, prompt, 4)).ttft for _ in range(probes)]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=len(others) + 8)) as client:  # fmt: skip
        started = [asyncio.Event() for _ in others]
        background = [asyncio.create_task(one_request(client, url, name, p, output_len * 4, flag))
                      for p, flag in zip(others, started)]  # fmt: skip
        await asyncio.wait_for(asyncio.gather(*(flag.wait() for flag in started)), 600)  # all are streaming
        busy = []
        for _ in range(probes):
            await asyncio.sleep(rng.uniform(0.0, 0.25))
            busy.append((await one_request(client, url, name, prompt, 4)).ttft)
        finished = sum(not task.done() for task in background)
        await asyncio.gather(*background)
    idle_ms, busy_ms = statistics.median(idle) * 1e3, statistics.median(busy) * 1e3
    return {"run": "ttft probe", "idle_ms": idle_ms, "busy_ms": busy_ms, "others": len(others),
            "streaming_throughout": finished == len(others), "ratio": busy_ms / idle_ms if idle_ms else float("nan"),
            "idle_all_ms": [t * 1e3 for t in idle], "busy_all_ms": [t * 1e3 for t in busy]}  # fmt: skip


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.clients:
        args.num_prompts = args.concurrency = args.clients
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.url:
            if args.compare:
                raise ValueError("--compare needs the in-process server (no --url)")
            url, name, ref, tokenizer = args.url.rstrip("/"), args.served_model_name or "default", None, None
            vocab = 30000
        else:
            model, tokenizer, ref = load_model(args)
            name = args.served_model_name or ("mid-glm" if args.mid else args.model)
            # the server checks ids against the tokenizer (--mid pairs a 32k model with the bundled 2k tokenizer)
            vocab = min(model.get_output_embeddings().out_features, len(tokenizer))
            queue = max(256, args.num_prompts)
            url = stack.enter_context(serving(model, tokenizer, name, args.max_num_seqs, queue, args.compile))
        prompts = make_prompts(args, tokenizer, vocab)
        print(f"# {url}: {name}, {args.num_prompts} requests, concurrency {args.concurrency}, input {args.input_len}"
              f", output {args.output_len}, {args.dtype}{', compiled' if args.compile else ''}"
              f", torch threads {torch.get_num_threads()}")  # fmt: skip
        asyncio.run(run_load(url, name, prompts[:2], 4, 2, float("inf"), args.seed))  # warm-up
        errors = []
        for round_ in range(args.rounds):
            rss_before = _rss_mb()
            results, duration = asyncio.run(run_load(url, name, prompts, args.output_len, args.concurrency,
                                                     args.request_rate, args.seed))  # fmt: skip
            label = f"concurrency {args.concurrency}" + (f", round {round_ + 1}" if args.rounds > 1 else "")
            rows.append(summary(results, duration, label))
            rows[-1]["rss_mb_before"], rows[-1]["rss_mb_after"] = rss_before, _rss_mb()
            print_summary(rows[-1])
            print(f"   RSS {rss_before:.0f} MB before, {rows[-1]['rss_mb_after']:.0f} MB after")
            errors += [r.error for r in results if not r.ok]
        for error in sorted(set(errors))[:5]:
            print(f"   failed: {error}")
        if args.compare:
            few = prompts[: max(1, args.ref_requests)]
            alone = summary(*asyncio.run(run_load(url, name, few, args.output_len, 1, float("inf"), args.seed)),
                            "one stream alone")  # fmt: skip
            rows.append(alone)
            print_summary(alone)
            if ref is not None:
                rows.append(reference_one_by_one(ref, few, args.output_len))
                print(f"## {rows[-1]['run']}: {rows[-1]['output_tok_per_s']:.1f} output tok/s")
            batched = rows[args.rounds - 1]["output_tok_per_s"]  # the last round's

            def ratio(base: float) -> float:
                return batched / base if base else float("nan")

            print(f"# aggregate {batched:.1f} tok/s = {ratio(alone['output_tok_per_s']):.2f}x one stream alone"
                  + (f", {ratio(rows[-1]['output_tok_per_s']):.2f}x the reference one by one" if ref else ""))
        if args.ttft_probe:
            others = prompts[1 : args.concurrency]
            rows.append(asyncio.run(ttft_probe(url, name, prompts[0], others, args.output_len, seed=args.seed)))
            p = rows[-1]
            print(f"# TTFT idle {p['idle_ms']:.1f} ms, beside {p['others']} streams {p['busy_ms']:.1f} ms "
                  f"({p['ratio']:.2f}x; medians of {len(p['busy_all_ms'])}); busy probes: "
                  + " ".join(f"{t:.0f}" for t in p["busy_all_ms"]) + " ms"
                  + ("" if p["streaming_throughout"] else " (some streams ended before the last probe)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.check and errors:
        total = args.rounds * len(prompts)
        print(f"# check failed: {len(errors)} of {total} streams incomplete or malformed", file=sys.stderr)
        return 1
    return 0
