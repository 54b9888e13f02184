"""Tensor-parallel decode benchmark: decode tokens/s of one model at TP 1, 2, … (torchrun, gloo on CPU,
NCCL on CUDA), eager and through the compiled step.

    python benchmarks/tp.py --quick                 # a small random GLM, TP 1 and 2, eager only
    python benchmarks/tp.py --sizes 1 2 4 --compile --device cuda --layers 8 --hidden 2048

The script builds a random GLM checkpoint in a temporary directory, then launches itself under
`python -m torch.distributed.run --standalone --nproc-per-node N` for each size; rank 0 prints a line
per mode, and the last table gives tokens/s and the ratio to TP 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(directory: Path, args: argparse.Namespace) -> None:
    import glmkit

    config = glmkit.GlmConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                              num_key_value_heads=2, head_dim=64, pad_token_id=0, eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    glmkit.GlmForCausalLM(config).to(getattr(torch, args.dtype)).save_pretrained(directory)


def rank_main(args: argparse.Namespace) -> None:
    """One rank: load split over the group, time greedy decoding (no EOS: every step runs)."""
    import torch.distributed as dist

    import glmkit

    torch.set_num_threads(args.threads)
    model = glmkit.GlmForCausalLM.from_pretrained(args.checkpoint, tp_plan="auto", dtype=args.dtype)
    model.generation_config.eos_token_id = None
    ids = torch.randint(2, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    results = {}
    for mode, fast in [("eager", {}), ("compiled", {"compile": True})][: 2 if args.compile else 1]:
        model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, **fast)  # warm-up (and compile)
        dist.barrier()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, **fast)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        results[mode] = args.batch * args.new_tokens / (time.perf_counter() - start)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


def launch(size: int, checkpoint: Path, argv: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={size}", __file__,
           "--rank-run", "--checkpoint", str(checkpoint), *argv]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(f"TP {size} failed:\n{out.stderr[-4000:]}")
    for line in out.stderr.splitlines():  # e.g. the compiled step falling back to eager
        if "Warning" in line:
            print(f"TP {size}: {line}", file=sys.stderr)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, few tokens (a minute on 2 CPU cores)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    if "--quick" in sys.argv:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(layers=2, hidden=512, vocab=8192, new_tokens=32)
    args, _ = parser.parse_known_args()
    if args.rank_run:
        return rank_main(args)
    shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
             "--new-tokens", str(args.new_tokens)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args)
        table = {size: launch(size, Path(tmp), [*sys.argv[1:], *shape]) for size in args.sizes}
    print(f"GLM {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, batch {args.batch}, "
          f"{args.new_tokens} new tokens, {args.threads} thread(s) per rank")  # fmt: skip
    for mode in table[args.sizes[0]]:
        base = table[args.sizes[0]][mode]
        for size, results in table.items():
            ratio = results[mode] / base
            print(f"  {mode:9s} TP {size}: {results[mode]:8.1f} tokens/s  ({ratio:.2f}x TP {args.sizes[0]})")


if __name__ == "__main__":
    main()
