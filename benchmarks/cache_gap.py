"""Do a small model's weights stay in the CPU caches between decode tokens? (CPU, fp32, batch 1)

The bundled GLM's 25 linears read 4.2 MB per token: that fits this machine's L3 many times over, so their
cost should be the same whether tokens come back to back or with the host busy in between. This script runs
the model's own linears, in a decode token's order, once per "token", with a gap of idle spinning (no memory
traffic from this process) before each, and prints the median time of the linears against the no-gap run:

    python benchmarks/cache_gap.py [--family glm] [--threads 2] [--tokens 300]

A ratio well above 1 at a gap of about one token's time (glmkit eager ~1.5 ms, the reference ~2 ms, compiled
~0.4 ms on the bundled GLM) means the weights were evicted by something outside this process (on a shared VM:
the neighbours of the shared L3): a slower token then also makes its own linears slower.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glmkit import AutoModelForCausalLM, bundled
from glmkit.bench import linears_seconds

CPU = torch.device("cpu")


def linears_time(model: torch.nn.Module, gap_s: float, tokens: int) -> float:
    """Median seconds of one token's linears (`glmkit.bench.linears_seconds`) when each token follows `gap_s` of
    idle spinning."""
    times = []
    for _ in range(tokens):
        start = time.perf_counter()
        while time.perf_counter() - start < gap_s:
            pass
        times.append(linears_seconds(model, 1, 1, CPU))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="glm", choices=bundled.FAMILIES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--gaps-ms", type=float, nargs="+", default=[0, 0.2, 0.5, 1, 2, 4])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(bundled.path(args.family)).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    megabytes = sum(p.numel() for m in linears for p in m.parameters(recurse=False)) * 4 / 1e6
    print(f"bundled {args.family}: {len(linears)} linears, {megabytes:.1f} MB per token, {args.threads} threads")
    linears_time(model, 0, 50)  # warm-up
    base = None
    for gap in args.gaps_ms:
        seconds = linears_time(model, gap / 1e3, args.tokens)
        base = base or seconds
        print(f"gap {gap:4.1f} ms before each token: linears {seconds * 1e6:6.0f} us  ({seconds / base:.2f}x no gap)")


if __name__ == "__main__":
    main()
