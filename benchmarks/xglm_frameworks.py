"""XGLM decode speed in Flax / TensorFlow: glmkit.flax and glmkit.tf against the reference's FlaxXGLMForCausalLM /
TFXGLMForCausalLM `generate`, greedy or beam search (--num-beams), on the same random weights (built in transformers,
saved, loaded by both).

    .venv-flax/bin/python benchmarks/xglm_frameworks.py --framework flax [--quick] [--num-beams 4]
    .venv-tf/bin/python benchmarks/xglm_frameworks.py --framework tf [--quick]

Each side is run once to compile (not timed), then timed over --repeats runs (best kept). EOS is an id outside the
vocabulary, so every run decodes exactly --new-tokens per row. Prints tokens/s and ours / reference ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import numpy as np

SIZES = {"quick": dict(d_model=256, ffn_dim=1024, num_layers=4, attention_heads=4, vocab_size=4096),
         "full": dict(d_model=1024, ffn_dim=4096, num_layers=8, attention_heads=16, vocab_size=32000)}  # fmt: skip


def build(path: str, size: dict, max_positions: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    # eos = vocab_size: an id no argmax can produce, so every run decodes all its tokens
    config = transformers.XGLMConfig(**size, max_position_embeddings=max_positions, eos_token_id=size["vocab_size"],
                                     dropout=0.0, attention_dropout=0.0)  # fmt: skip
    transformers.XGLMForCausalLM(config).save_pretrained(path)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def flax_runs(path: str, ids: np.ndarray, new: int, beams: int) -> dict[str, Callable[[], object]]:
    import jax
    import transformers

    from glmkit.flax import FlaxXGLMForCausalLM

    ours = FlaxXGLMForCausalLM.from_pretrained(path)
    ref = transformers.FlaxXGLMForCausalLM.from_pretrained(path, from_pt=True)
    total = ids.shape[1] + new
    kw = dict(max_length=total, do_sample=False, pad_token_id=1, num_beams=beams)
    ref_jit = jax.jit(lambda i: ref.generate(i, **kw).sequences)
    return {
        "glmkit.flax generate (jitted prefill + while_loop)":
            lambda: ours.generate(ids, max_new_tokens=new, num_beams=beams).sequences.block_until_ready(),
        "reference generate": lambda: ref.generate(ids, **kw).sequences.block_until_ready(),
        "reference jax.jit(generate)": lambda: ref_jit(ids).block_until_ready(),
    }  # fmt: skip


def tf_runs(path: str, ids: np.ndarray, new: int, beams: int) -> dict[str, Callable[[], object]]:
    import tensorflow as tf
    import transformers

    from glmkit.tf import TFXGLMForCausalLM

    ours = TFXGLMForCausalLM.from_pretrained(path)
    ref = transformers.TFXGLMForCausalLM.from_pretrained(path, from_pt=True)
    ref_xla = tf.function(ref.generate, jit_compile=True)
    tensor = tf.constant(ids)
    kw = dict(max_new_tokens=new, do_sample=False, num_beams=beams)
    return {
        "glmkit.tf generate (XLA)": lambda: ours.generate(ids, max_new_tokens=new, num_beams=beams).numpy(),
        "reference generate (eager)": lambda: ref.generate(tensor, **kw).numpy(),
        "reference tf.function(generate, jit_compile=True)": lambda: ref_xla(tensor, **kw).numpy(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=["flax", "tf"], required=True)
    parser.add_argument("--quick", action="store_true", help="small model, 32 new tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    new = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or 5
    ids = np.random.default_rng(0).integers(3, size["vocab_size"], (args.batch, args.prompt)).astype(np.int32)
    with tempfile.TemporaryDirectory() as path:
        build(path, size, args.prompt + new + 8)
        runs = (flax_runs if args.framework == "flax" else tf_runs)(path, ids, new, args.num_beams)
        rates = {name: args.batch * new / best_seconds(run, repeats) for name, run in runs.items()}
    mode = f"beam search ({args.num_beams} beams)" if args.num_beams > 1 else "greedy"
    print(f"XGLM {args.framework} decode, {size}, batch {args.batch}, prompt {args.prompt}, {new} new tokens, {mode}")
    ours_name = next(iter(rates))
    for name, rate in rates.items():
        ratio = "" if name == ours_name else f"  (glmkit {rates[ours_name] / rate:.2f}x)"
        print(f"  {name:55s} {rate:9.1f} tokens/s{ratio}")


if __name__ == "__main__":
    main()
