"""How fast can PyTorch's own kernels read a decode step's weights? (CPU, fp32, batch 1)

Runs every linear of one decode token of the mid-shape GLM (`glmkit.bench.CPU_SHAPES`: 8 layers of
query_key_value, dense, dense_h_to_4h, dense_4h_to_h, then the 32k x 1024 LM head; 482 MB, far more than any
cache) in order, on a one-token input, through each fp32 matrix-vector path PyTorch has, and prints the bytes
read per second of each next to a plain `torch.sum` over the same weights (the read roofline of `glmkit bench`):

    python benchmarks/gemv.py [--threads 2] [--repeats 7]

Paths: `F.linear` (MKL), oneDNN's matmul on the plain weight (`glmkit.layers.linear`) and on its own blocked
layout, MKL's packed GEMM (what inductor's freezing picks for fp32), `torch.mv`, the chain of linears under
torch.compile (inductor), and `(w * x).sum(-1)` under torch.compile (what `glmkit.layers.linear` runs for one row
in a compiled graph: inductor makes it a single vectorised pass over the weight). The packed layouts keep a second
copy of the weights. The tokens/s a model could reach if its linears were the only cost is printed beside each,
which bounds a decode path on that kernel from above.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from glmkit.bench import CPU_SHAPES


def decode_weights(shape: dict) -> list[torch.Tensor]:
    """The mid-shape GLM's linear weights (out, in), in the order one decode token reads them."""
    C, F_, H, Hkv, D = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads", "head_dim"))  # fmt: skip
    layer = [(H * D + 2 * Hkv * D, C), (C, H * D), (2 * F_, C), (C, F_)]
    return [torch.randn(out, inp) for _ in range(shape["num_hidden_layers"]) for out, inp in layer] + \
        [torch.randn(shape["vocab_size"], C)]  # fmt: skip


def seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = decode_weights(CPU_SHAPES["glm"])
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    inputs = [torch.randn(1, 1, w.shape[1]) for w in weights]
    vectors = [x.view(-1) for x in inputs]

    def chain(linear: Callable) -> Callable[[], None]:
        return lambda: [linear(x, w) for x, w in zip(inputs, weights)]

    def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    onednn_packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]  # oneDNN's blocked layout
    mkl_packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in weights]  # what inductor's freezing uses
    compiled = torch.compile(lambda xs, ws: [F.linear(x, w) for x, w in zip(xs, ws)], dynamic=False)
    # what glmkit.layers.linear does for one row in a compiled graph: inductor fuses it into one pass over the weight
    multiply_reduce = torch.compile(lambda xs, ws: [(w * x.unsqueeze(-2)).sum(-1) for x, w in zip(xs, ws)],
                                    dynamic=False)  # fmt: skip
    paths = {
        "torch.sum (read roofline)": lambda: [w.sum() for w in weights],
        "F.linear (MKL)": chain(F.linear),
        "oneDNN, plain weight": chain(onednn),
        "oneDNN, packed weight": lambda: [onednn(x, w) for x, w in zip(inputs, onednn_packed)],
        "MKL, packed weight": lambda: [
            torch.ops.mkl._mkl_linear(x, p, w, None, 1) for x, p, w in zip(inputs, mkl_packed, weights)
        ],
        "torch.mv": lambda: [torch.mv(w, v) for v, w in zip(vectors, weights)],
        "torch.compile (inductor)": lambda: compiled(inputs, weights),
        "compiled multiply-reduce": lambda: multiply_reduce(inputs, weights),
    }
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, {len(weights)} weights, "
          f"{nbytes / 1e6:.0f} MB per token, {args.repeats} repeats")  # fmt: skip
    print(f"{'path':28} {'best GB/s':>9} {'median GB/s':>11} {'ms/token':>9} {'tok/s bound':>11}")
    for name, fn in paths.items():
        best, median = seconds(fn, args.repeats)
        print(f"{name:28} {nbytes / best / 1e9:9.1f} {nbytes / median / 1e9:11.1f} {median * 1e3:9.2f} "
              f"{1 / median:11.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
