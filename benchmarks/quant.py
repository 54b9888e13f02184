"""Weight-only quantization decode benchmark: batch-1 CPU decode tokens/s at mid shapes (GLM, hidden 1024,
8 layers, vocab 32k, random weights), the reference's fp32 generate() against glmkit fp32 / bf16 / int8 /
int4, side by side in one run (each repeat runs every implementation once, alternating; see glmkit/bench.py
for the method: decode tok/s = (N-1) / (t(N) - t(1)), best of the repeats, "paired" = median per-repeat ratio).

    python benchmarks/quant.py [--new 32] [--repeats 3] [--group-size 128] [--compile] [--threads N]
        [--llama-cpp auto|on|off] [--llama-cpp-src DIR]
    (--compile: the reference and the +head rows eager and through generate(compile=True); ~3 minutes)

int8 / int4 rows run bf16 activations (the ATen kernels' fast path; with fp32 activations the int8 kernel is
several times slower than a plain fp32 matmul); "+head" rows quantize lm_head too (at vocab 32k it is a
quarter of what a step reads).
The issue's targets: int8 >= 2.5x, int4 >= 3x the reference's fp32. With llama-cpp-python importable (and its
converter found: see `python -m glmkit.bench --help`), llama.cpp q8_0 and q4_0 of the same weights (converted to
GGUF f32, quantized by llama.cpp with its defaults, output matrix included) are timed in the same run and each
quantized row is divided by them; without it, by the figures issue 15 published (2026-11-29, another host: 7.4x
and 11.8x the reference's fp32).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from glmkit.bench import CPU_SHAPES, build_pair, generate_impl, llama_impls, print_rows, set_threads, time_impls
from glmkit.quant import quantize_

LLAMA_CPP_X_REF = {"q8_0": 7.4, "q4_0": 11.8}  # issue 15, measured 2026-11-29


def implementations(args: argparse.Namespace) -> dict:
    ref, ours = build_pair("glm", CPU_SHAPES["glm"], torch.float32, torch.device("cpu"))
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    g = args.group_size
    quantized = {
        "glmkit int8": quantize_(copy.deepcopy(bf16), "int8"),
        "glmkit int8+head": quantize_(copy.deepcopy(bf16), "int8", include_lm_head=True),
        f"glmkit int4 g{g}": quantize_(copy.deepcopy(bf16), "int4", group_size=g),
        f"glmkit int4 g{g}+head": quantize_(copy.deepcopy(bf16), "int4", group_size=g, include_lm_head=True),
    }
    impls = {"reference fp32": generate_impl(ref, 0)}
    if args.llama_cpp != "off":
        impls.update(llama_impls(ours, args, torch.device("cpu"), quants=("q8_0", "q4_0")))
    if args.compile:  # the +head configurations, eager and through generate(compile=True), in one ~3 min run
        for name in ("glmkit int8+head", f"glmkit int4 g{g}+head"):
            impls[name] = generate_impl(quantized[name], 0)
            impls[name.replace("glmkit ", "") + " compiled"] = generate_impl(quantized[name], 0, compile=True)
        return impls
    impls.update({"glmkit fp32": generate_impl(ours, 0), "glmkit bf16": generate_impl(bf16, 0)})
    impls.update({name: generate_impl(model, 0) for name, model in quantized.items()})
    return impls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=32, help="new tokens per timed generate (default 32)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    parser.add_argument("--compile", action="store_true",
                        help="instead: the reference, and int8+head / int4+head eager and compiled")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--llama-cpp", choices=("auto", "on", "off"), default="auto",
                        help="llama.cpp q8_0 / q4_0 of the same weights: auto = when importable")  # fmt: skip
    parser.add_argument("--llama-cpp-src", help="the unpacked llama-cpp-python sdist (its converter)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    impls = implementations(args)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, CPU_SHAPES["glm"]["vocab_size"], (1, args.prompt), generator=generator)
    results = time_impls(impls, ids, args.new, args.repeats, torch.device("cpu"))
    rows = [dict(family="glm", **r) for r in results.values()]
    print(f"# CPU, {threads} threads, batch 1, P={args.prompt}, N={args.new}, best of {args.repeats}; "
          f"'tokens = ref' is expected NO for bf16 / quantized rows (other numerics)")  # fmt: skip
    print_rows(rows)
    measured = {r["impl"].removeprefix("llama.cpp "): r["ratio"] for r in rows if r["impl"].startswith("llama.cpp")}
    for r in rows:
        peer = "q8_0" if "int8" in r["impl"] else "q4_0" if "int4" in r["impl"] else None
        if peer:
            peer_x = measured.get(peer, LLAMA_CPP_X_REF[peer])
            source = "in this run" if peer in measured else "issue 15's figure"
            print(f"# {r['impl']}: {r['ratio']:.2f}x the reference fp32 = {r['ratio'] / peer_x:.2f} of "
                  f"llama.cpp {peer}'s {peer_x:.2f}x ({source})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
