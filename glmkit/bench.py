"""Decode benchmark: glmkit against the reference (transformers) on the same random weights, in one process.

    python benchmarks/decode.py                          # CPU, fp32, mid-size shapes of every family
    python benchmarks/decode.py --dtype bf16 --family glm
    python benchmarks/decode.py --device cuda --dtype bf16   # GLM-4-9B / Persimmon-8B / xglm-564M shapes
    python benchmarks/decode.py --load                   # peak RSS and time while loading a checkpoint
    python benchmarks/decode.py --deep --compile --batch 1   # 40 narrow layers: host overhead dominates

Both models share one set of weight tensors (glmkit's parameter names are the checkpoint's, so the
reference's state dict assigns straight in). Each repeat runs every implementation once, alternating, so
a noisy machine hurts them alike. Decode tok/s = B*(N-1) / (t(N new) - t(1 new)),
which cancels the prefill; prefill tok/s = B*P / t(1 new); times are the best of the repeats (on a
shared machine the minimum is the least disturbed estimate). "x ref" divides those best figures; "paired"
is the median over repeats of the ratio within one repeat (robust when contention drifts during a run).
The roofline is the bytes a decode step must read (all weights except the embedding rows not gathered,
plus the KV cache) at the memory bandwidth measured in the same run (a sum over a tensor far larger than
the caches).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

FAMILIES = {  # family: (reference config, reference model, glmkit model)
    "glm": ("GlmConfig", "GlmForCausalLM", "GlmForCausalLM"),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", "PersimmonForCausalLM"),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", "XGLMForCausalLM"),
}
TOKENS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=1)
# mid-size CPU shapes (~120-135M parameters, ~0.5 GB read per fp32 decode step: far past the caches)
CPU_SHAPES = {
    "glm": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=1, head_dim=64, **TOKENS),
    "persimmon": dict(vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                      num_attention_heads=16, **TOKENS),
    "xglm": dict(vocab_size=32768, d_model=1024, ffn_dim=4096, num_layers=8, attention_heads=16,
                 dropout=0.0, attention_dropout=0.0, **TOKENS),
}  # fmt: skip
# --deep: GLM-4-9B's 40 layers at width 256 (120-150 MB read per fp32 step): host time per layer dominates, as
# for small models and on fast GPUs
DEEP_SHAPES = {
    "glm": dict(CPU_SHAPES["glm"], hidden_size=256, intermediate_size=704, num_hidden_layers=40,
                num_attention_heads=4, head_dim=64, vocab_size=8192),
    "persimmon": dict(CPU_SHAPES["persimmon"], hidden_size=256, intermediate_size=1024, num_hidden_layers=40,
                      num_attention_heads=4, vocab_size=8192),
    "xglm": dict(CPU_SHAPES["xglm"], d_model=256, ffn_dim=1024, num_layers=40, attention_heads=4, vocab_size=8192),
}  # fmt: skip
# GPU: the real GLM-4-9B, Persimmon-8B and xglm-564M shapes (the reference configs' defaults)
GPU_SHAPES = {"glm": {}, "persimmon": {}, "xglm": dict(dropout=0.0, attention_dropout=0.0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bandwidth(device: torch.device, nbytes: int) -> float:
    """Memory bandwidth in bytes/s: the better of a sum (reads `nbytes`) and a copy (reads and writes
    them), best of 5 each, over fp32 tensors far larger than the caches."""
    x = torch.ones(nbytes // 4, device=device)
    y = torch.empty_like(x)
    x.sum(), y.copy_(x)
    read = nbytes / min(timed(x.sum, device) for _ in range(5))
    copy = 2 * nbytes / min(timed(lambda: y.copy_(x), device) for _ in range(5))
    return max(read, copy)


def build_pair(family: str, shape: dict, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(reference model, glmkit model) sharing the same random weight tensors."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the benchmark compares against transformers: pip install 'glmkit[test]'") from err

    import glmkit

    config_name, ref_name, ours_name = FAMILIES[family]
    ref_config = getattr(transformers, config_name)(**shape)
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = getattr(transformers, ref_name)(ref_config).eval()
    finally:
        torch.set_default_dtype(default)
    with tempfile.TemporaryDirectory() as tmp:
        ref_config.save_pretrained(tmp)
        config = glmkit.AutoConfig.from_pretrained(tmp)
    with torch.device("meta"):
        ours = getattr(glmkit, ours_name)(config)
    missing = ours.load_state_dict(ref.state_dict(), strict=False, assign=True).missing_keys
    ours.tie_weights()
    missing = [n for n in missing if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or any(p.is_meta for p in ours.parameters()):
        raise RuntimeError(f"{family}: weights not shared: {missing}")
    return ref, ours.eval()


def step_bytes(model: Any, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once (the embedding table only for the rows
    gathered, unless it is also the lm_head) plus the K/V of `context` positions per row."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    total = 0
    for p in model.parameters():  # tied tensors are listed once
        total += p.numel() * p.element_size() if (p is not embed or tied) else batch * p[0].numel() * p.element_size()
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return total + c.num_hidden_layers * 2 * batch * heads * head_dim * context * embed.element_size()


def run_family(family: str, args: argparse.Namespace, device: torch.device, bw: list[float]) -> list[dict]:
    """Time every implementation, alternating; bandwidth is re-measured each repeat (appended to bw)."""
    shape = (DEEP_SHAPES if args.deep else GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[family]
    dtype = DTYPES[args.dtype]
    ref, ours = build_pair(family, shape, dtype, device)
    impls = {
        "reference": (ref, {}),
        "glmkit": (ours, {}),
        "glmkit static": (ours, {"cache_implementation": "static"}),
    }
    if args.compile:
        impls["glmkit compiled"] = (ours, {"compile": True})
    rows = []
    for batch in args.batch:
        ids = torch.randint(3, ours.config.vocab_size, (batch, args.prompt), device=device,
                            generator=torch.Generator(device).manual_seed(batch))  # fmt: skip
        common = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        outputs = {}
        for name, (model, extra) in impls.items():  # warm-up (and compile), and the tokens to compare
            outputs[name] = model.generate(ids, max_new_tokens=args.new, **common, **extra)
        times: dict[str, dict[int, list[float]]] = {name: {1: [], args.new: []} for name in impls}
        for _ in range(args.repeats):
            bw.append(bandwidth(device, (4 << 30) if device.type == "cuda" else (1 << 30)))
            for n in (1, args.new):
                for name, (model, extra) in impls.items():
                    kwargs = dict(max_new_tokens=n, **common, **extra)
                    times[name][n].append(timed(lambda m=model, k=kwargs, x=ids: m.generate(x, **k), device))
        need = step_bytes(ours, batch, args.prompt + args.new // 2)
        ref_decode = None
        for name in impls:
            t1, tn = min(times[name][1]), min(times[name][args.new])
            decode = batch * (args.new - 1) / max(tn - t1, 1e-9)
            ref_decode = ref_decode or decode
            # the same ratio repeat by repeat (runs minutes apart see different contention), median of them
            paired = [(rn - r1) / max(n - o, 1e-9) for r1, rn, o, n in
                      zip(times["reference"][1], times["reference"][args.new], times[name][1], times[name][args.new])]
            rows.append(dict(family=family, batch=batch, impl=name, prefill=batch * args.prompt / t1,
                             decode=decode, ratio=decode / ref_decode, paired_ratio=statistics.median(paired),
                             step_bytes=need, same=torch.equal(outputs[name], outputs["reference"])))  # fmt: skip
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'family':10} {'B':>2} {'impl':16} {'prefill tok/s':>13} {'decode tok/s':>12} {'x ref':>6} "
          f"{'paired':>6} {'roofline':>8}  tokens = ref")  # fmt: skip
    for r in rows:
        print(f"{r['family']:10} {r['batch']:>2} {r['impl']:16} {r['prefill']:13.1f} {r['decode']:12.2f} "
              f"{r['ratio']:6.2f} {r['paired_ratio']:6.2f} {r['roofline']:8.0%}  "
              f"{'yes' if r['same'] else 'NO'}")  # fmt: skip


# ---- loading ------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def load_child(directory: str, dtype: str, warmup: str) -> None:
    """In a fresh process: peak resident memory and time of from_pretrained, as JSON on stdout. A tiny
    checkpoint is loaded first: the first call's one-time imports and set-up are not loading."""
    import glmkit

    glmkit.AutoModelForCausalLM.from_pretrained(warmup)
    base = _status_kb("VmRSS")
    try:  # reset the high-water mark to now (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    start = time.perf_counter()
    model = glmkit.AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype])
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = (_status_kb("VmHWM") - base) * 1024
    print(json.dumps(dict(peak=peak, weights=weights, seconds=seconds)))


def run_load(args: argparse.Namespace) -> list[dict]:
    import glmkit

    rows = []
    for family in args.family:
        config = getattr(glmkit, FAMILIES[family][0])(**CPU_SHAPES[family])
        model = getattr(glmkit, FAMILIES[family][2])(config)
        tiny = getattr(glmkit, FAMILIES[family][0])(**{**CPU_SHAPES[family], "vocab_size": 64})
        tiny.num_hidden_layers = 1
        for saved, loaded in (("bf16", "bf16"), ("fp32", "fp32"), ("fp32", "bf16")):
            with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as warmup:
                model.to(DTYPES[saved]).save_pretrained(tmp)
                getattr(glmkit, FAMILIES[family][2])(tiny).save_pretrained(warmup)
                cmd = [sys.executable, "-m", "glmkit.bench", "--load-child", tmp, loaded, warmup]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                rows.append(dict(family=family, saved=saved, loaded=loaded, **r))
    print(f"{'family':10} {'checkpoint':>10} {'loaded as':>9} {'weights MB':>10} {'peak RSS MB':>11} "
          f"{'ratio':>6} {'seconds':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['family']:10} {r['saved']:>10} {r['loaded']:>9} {r['weights'] / 1e6:10.1f} "
              f"{r['peak'] / 1e6:11.1f} {r['peak'] / r['weights']:6.3f} {r['seconds']:7.2f}")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=sorted(FAMILIES), choices=sorted(FAMILIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128, help="prompt length P")
    parser.add_argument("--new", type=int, default=None, help="new tokens N (default 32 CPU, 128 GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores available)")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument("--load", action="store_true", help="measure checkpoint loading instead")
    parser.add_argument("--deep", action="store_true", help="40 narrow layers: the host-overhead-bound regime")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--load-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_child:
        load_child(*args.load_child)
        return 0
    from glmkit.generation.fast import configure_cpu_threads

    threads = configure_cpu_threads(args.threads)
    if args.load:
        rows = run_load(args)
    else:
        device = torch.device(args.device)
        args.new = args.new or (128 if device.type == "cuda" else 32)
        bw = [bandwidth(device, (4 << 30) if device.type == "cuda" else (1 << 30))]
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
        print(f"# {name}, {args.dtype}, P={args.prompt}, N={args.new}")
        rows = []
        for family in args.family:
            rows += run_family(family, args, device, bw)
            for r in rows:  # the roofline uses the best bandwidth seen so far: contention only lowers it
                r["bandwidth"] = max(bw)
                r["roofline"] = r["decode"] * r["step_bytes"] / (r["batch"] * max(bw))
            print_rows([r for r in rows if r["family"] == family])
        print(f"# bandwidth measurements (GB/s): {', '.join(f'{b / 1e9:.1f}' for b in bw)}; best {max(bw) / 1e9:.1f}")
        print("# final table (roofline shares at the best bandwidth of the whole run):")
        print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
