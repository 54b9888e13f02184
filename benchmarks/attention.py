"""Forward-pass time of each attn_implementation on a random GLM, as ratios to sdpa (prints, asserts nothing).

    python benchmarks/attention.py            # 4 layers, hidden 512, one row of 1024 tokens, CPU
    python benchmarks/attention.py --quick    # tiny shapes, a few seconds
    python benchmarks/attention.py --device cuda --dtype bfloat16   # flash_attention_2 too, where installed

Two inputs: one plain causal row, and the same tokens packed as 8 documents (position_ids restarting at 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings

import torch

from glmkit import GlmConfig, GlmForCausalLM


def timed(model: GlmForCausalLM, ids: torch.Tensor, positions: torch.Tensor | None, repeats: int) -> float:
    """Median seconds of a no-cache forward pass (one warm-up call first: compiles, caches)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            if ids.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids, position_ids=positions, use_cache=False)
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # flex_attention's "called without torch.compile" note on CPU
    T, C, layers = (128, 128, 2) if args.quick else (1024, 512, 4)
    config = GlmConfig(vocab_size=1000, hidden_size=C, intermediate_size=2 * C, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=C // 8, pad_token_id=0,
                       eos_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    base = GlmForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.randint(0, 1000, (1, T), device=args.device)
    packed = torch.arange(T, device=args.device).remainder(T // 8)[None]  # 8 documents of T/8 tokens
    impls = ["sdpa", "eager", "flex_attention"]
    if args.device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        impls.append("flash_attention_2")
    print(f"# GLM {layers} layers, hidden {C}, 8 q / 2 kv heads, T={T}, {args.device} {args.dtype}")
    reference = {}
    for impl in impls:
        base.config._attn_implementation = impl
        for name, positions in (("causal", None), ("packed x8", packed)):
            seconds = timed(base, ids, positions, args.repeats)
            reference.setdefault(name, seconds)
            print(f"{impl:18s} {name:10s} {seconds * 1e3:9.1f} ms  {seconds / reference[name]:5.2f}x sdpa")


if __name__ == "__main__":
    main()
