"""GGUF import benchmark: a random mid-shape GLM (hidden 1024, 8 layers, vocab 32k) written as llama.cpp's
converter writes it (Q8_0 and Q4_0, with the gguf package), loaded by glmkit each way it can be, against the
reference's fp32 generate(): batch-1 CPU decode tokens/s (glmkit/bench.py's method), load seconds and load
peak RSS (each load in a fresh process) beside the file size, and what requantizing Q8_0 per channel costs.

    python benchmarks/gguf_import.py [--new 32] [--repeats 3] [--threads N] [--quick]
    (--quick: a 2-layer, vocab-8k model and one repeat: a smoke run of the script, not a figure)

Why Q8_0 is dequantized by default: its scale is per 32 weights, which the per-channel int8 kernel cannot
hold; the "Q8_0 -> int8" row (quantization="int8") shows the speed that requantizing buys and the
"requantized" line the error it adds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from glmkit import AutoModelForCausalLM
from glmkit.bench import CPU_SHAPES, build_pair, generate_impl, print_rows, set_threads, time_impls
from tests.conftest import max_rel_diff
from tests.quant.gguf_files import T, write_glm_gguf

VARIANTS = {  # row name -> (file, from_pretrained keywords)
    "Q8_0 -> fp32": ("Q8_0", dict(dtype=torch.float32)),
    "Q8_0 -> bf16": ("Q8_0", dict(dtype=torch.bfloat16)),
    "Q8_0 -> int8": ("Q8_0", dict(dtype=torch.bfloat16, quantization="int8")),
    "Q4_0 -> int4 g32": ("Q4_0", dict(dtype=torch.bfloat16)),
}
_PEAK = """
import ast, sys, torch, time
from glmkit import AutoModelForCausalLM
from glmkit.bench import _status_kb
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = _status_kb("VmRSS")
start = time.perf_counter()
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]), **ast.literal_eval(sys.argv[3]))
print(time.perf_counter() - start, (_status_kb("VmHWM") - before) / 1024)
"""


def load_figures(path: Path, kwargs: dict) -> tuple[float, float]:
    """(seconds, peak RSS growth in MB) of one from_pretrained in a fresh process."""
    dtype = str(kwargs["dtype"]).removeprefix("torch.")
    extra = repr({k: v for k, v in kwargs.items() if k != "dtype"})
    done = subprocess.run([sys.executable, "-c", _PEAK, str(path), dtype, extra], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    seconds, megabytes = done.stdout.split()
    return float(seconds), float(megabytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=32, help="new tokens per timed generate (default 32)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a small model, one repeat: a smoke run")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    shape = dict(CPU_SHAPES["glm"], **(dict(num_hidden_layers=2, vocab_size=8192) if args.quick else {}))
    repeats = 1 if args.quick else args.repeats
    ref, _ = build_pair("glm", shape, torch.float32, torch.device("cpu"))
    same = dict(rms_norm_eps=ref.config.rms_norm_eps)  # the converter writes 1e-5 for every GlmForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        files = {q: write_glm_gguf(ref, Path(tmp) / f"glm.{q}.gguf", getattr(T, q)) for q in ("Q8_0", "Q4_0")}
        models = {row: AutoModelForCausalLM.from_pretrained(files[f], **kw, **same)
                  for row, (f, kw) in VARIANTS.items()}  # fmt: skip
        loads = {row: load_figures(files[f], {**kw, **same}) for row, (f, kw) in VARIANTS.items()}
        sizes = {name: path.stat().st_size / 1e6 for name, path in files.items()}
        int8_fp32 = AutoModelForCausalLM.from_pretrained(files["Q8_0"], quantization="int8", **same)
    ids = torch.randint(3, shape["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
    impls = {"reference fp32": generate_impl(ref, 0), **{row: generate_impl(m, 0) for row, m in models.items()}}
    results = time_impls(impls, ids, args.new, repeats, torch.device("cpu"))
    print(f"# CPU, {threads} threads, batch 1, P={args.prompt}, N={args.new}, best of {repeats}"
          f"{' (QUICK: not a figure)' if args.quick else ''}; 'tokens = ref' is NO for quantized rows")  # fmt: skip
    print_rows([dict(family="glm", **r) for r in results.values()])
    for row, (file, _) in VARIANTS.items():
        seconds, megabytes = loads[row]
        print(f"# load {row:17}: {seconds:5.2f} s, peak RSS +{megabytes:6.1f} MB ({file} file {sizes[file]:.1f} MB)")
    text = torch.randint(3, shape["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the error each way adds to the file's exact (dequantized, fp32) weights
        exact = models["Q8_0 -> fp32"](text).logits
        for row, model in (("Q8_0 -> int8 (fp32)", int8_fp32), ("Q8_0 -> bf16", models["Q8_0 -> bf16"])):
            logits = model(text).logits.float()
            agree = (logits.argmax(-1) == exact.argmax(-1)).float().mean()
            print(f"# {row:19} vs the file's exact weights: logits max rel diff {max_rel_diff(exact, logits):.2e}, "
                  f"argmax agrees on {agree:.1%} of 128 positions")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
