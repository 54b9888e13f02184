"""Candidates scored per second: glmkit's harness model against lm-evaluation-harness's own `hf` backend.

    python benchmarks/score.py [--model DIR] [--questions 32] [--choices 4] [--context-chars 1200] [--batch 8]
                               [--device cpu] [--threads N] [--repeats 3]

A multiple-choice task in the few-shot shape (a long shared context, several short candidates) built from
Tiny Shakespeare: each question's context is a passage, its candidates the true next line and lines from
elsewhere. Both backends get the same requests on the same checkpoint (default: the bundled GLM), fp32; each
is timed `--repeats` times, alternating, best run kept, after a warm-up. The numbers of the two are compared
too (max relative difference). Without lm_eval installed the reference is transformers called directly the
way the hf backend calls it (context + candidate per row, right-padded batches, log-softmax).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]


def build_task(questions: int, choices: int, context_chars: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, candidate) requests, `choices` per question, the contexts repeated for their candidates."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()
    lines = [line for line in text.splitlines() if len(line) > 20]
    rng = random.Random(seed)
    requests = []
    for _ in range(questions):
        start = rng.randrange(0, len(text) - context_chars - 200)
        context = text[start : start + context_chars]
        true_next = " " + next(line for line in text[start + context_chars :].split("\n") if line.strip()).strip()
        candidates = [true_next] + [" " + rng.choice(lines).strip() for _ in range(choices - 1)]
        requests += [(context, c) for c in candidates]
    return requests


def timed(run, requests: list, repeats: int) -> tuple[float, list[float]]:
    best, values = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        values = run(requests)
        best = min(best, time.perf_counter() - start)
    return best, values


def harness_backends(model: str, batch: int, device: str) -> dict:
    from lm_eval.models.huggingface import HFLM

    import glmkit.eval.harness as harness

    ours = harness.GlmkitLM(pretrained=model, dtype="float32", batch_size=batch, device=device)
    plain = harness.GlmkitLM(pretrained=model, dtype="float32", batch_size=batch, device=device, reuse_prefix=False)
    ref = HFLM(pretrained=model, dtype="float32", batch_size=batch, device=device)

    def runner(lm):
        return lambda reqs: [lp for lp, _ in lm.loglikelihood([SimpleNamespace(args=r) for r in reqs], True)]

    return {"hf backend": runner(ref), "glmkit": runner(ours), "glmkit, no prefix reuse": runner(plain)}


def transformers_backends(model: str, batch: int, device: str) -> dict:
    """Without lm_eval: transformers the hf backend's way against glmkit.score."""
    import transformers

    from glmkit import AutoModelForCausalLM, AutoTokenizer, score
    from glmkit.eval import encode_pair, prefix_ids, text_encoder

    ref = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
    ours = AutoModelForCausalLM.from_pretrained(model, dtype="float32", device_map=device)
    tokenizer = AutoTokenizer.from_pretrained(model)
    encode, prefix = text_encoder(tokenizer), prefix_ids(tokenizer)

    @torch.no_grad()
    def reference(reqs):
        out = []
        for i in range(0, len(reqs), batch):
            pairs = [encode_pair(encode, prefix, c, x) for c, x in reqs[i : i + batch]]
            rows = [c + x[:-1] for c, x in pairs]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
            logprobs = torch.log_softmax(ref(ids).logits.float(), -1)
            for b, (c, x) in enumerate(pairs):
                span = logprobs[b, len(c) - 1 : len(c) - 1 + len(x)]
                out.append(float(span.gather(-1, torch.tensor(x, device=device)[:, None]).sum()))
        return out

    def glmkit_run(reuse):
        return lambda reqs: [s.logprob for s in score(ours, tokenizer, *zip(*reqs), batch_size=batch,
                                                      reuse_prefix=reuse)]  # fmt: skip

    return {"transformers": reference, "glmkit": glmkit_run(True), "glmkit, no prefix reuse": glmkit_run(False)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled GLM)")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--context-chars", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from glmkit import bundled

    model = args.model or str(bundled.path("glm"))
    try:
        import lm_eval  # noqa: F401

        backends = harness_backends(model, args.batch, args.device)
    except ImportError:
        print("(lm_eval not installed: the reference is transformers called directly)", file=sys.stderr)
        backends = transformers_backends(model, args.batch, args.device)
    requests = build_task(args.questions, args.choices, args.context_chars)
    for run in backends.values():  # warm-up
        run(requests[: 2 * args.choices])
    results = {name: [float("inf"), None] for name in backends}
    for _ in range(args.repeats):  # alternating, so that a noisy neighbour hurts every backend alike
        for name, run in backends.items():
            seconds, values = timed(run, requests, 1)
            results[name] = [min(results[name][0], seconds), values]
    reference_name = next(iter(backends))
    ref_seconds, ref_values = results[reference_name]
    print(f"{args.questions} questions x {args.choices} candidates, contexts of {args.context_chars} characters, "
          f"batch {args.batch}, {args.device}, fp32, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")  # fmt: skip
    for name, (seconds, values) in results.items():
        diff = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(values, ref_values))
        print(f"  {name:24} {len(requests) / seconds:8.1f} candidates/s  {ref_seconds / seconds:5.2f}x  "
              f"(max rel. diff to {reference_name}: {diff:.1e})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
