"""Decode benchmark: glmkit against the reference (transformers) on the same weights, in one process.

    glmkit bench                                         # CPU, fp32, random weights at mid-size shapes
    glmkit bench --dtype bf16 --family glm
    glmkit bench --device cuda --dtype bf16 --compile --ref-compile   # GLM-4-9B / Persimmon-8B / xglm-564M
    glmkit bench --bundled --stream --lookup             # the bundled default models: the engine targets
    glmkit bench --load                                  # peak RSS and time while loading a checkpoint
    glmkit bench --deep --compile --batch 1              # 40 narrow layers: host overhead dominates
    glmkit bench serve --mid --compare                   # the OpenAI server under load (glmkit/serve/bench.py)
    (python benchmarks/decode.py ARGS runs the same code; benchmarks/gpu.sh is the whole GPU session)

Random weights (the default): both models share one set of weight tensors (glmkit's parameter names are
the checkpoint's, so the reference's state dict assigns straight in). Each repeat runs every
implementation once, alternating, so a noisy machine hurts them alike. Decode tok/s =
B*(N-1) / (t(N new) - t(1 new)), which cancels the prefill; prefill tok/s = B*P / t(1 new); generate tok/s
= B*N / t(N new), what a caller of generate() sees; times are the best of the repeats (on a shared machine
the minimum is the least disturbed estimate). "x ref" divides those best figures; "paired" is the median
over repeats of the decode ratio within one repeat (robust when contention drifts during a run).
--compile adds generate(compile=True); --ref-compile the reference's static cache with its own torch.compile
(CompileConfig: "reduce-overhead", i.e. CUDA graphs, on GPU; not for XGLM, which the reference cannot).
Compiled rows are timed in a second round, alternating with the reference (and llama.cpp) again (their "x ref"
is within that round), so that a timeout during a long compile still leaves the eager rows. "linears only" is
the model's own linears alone, called back to back on one-token inputs through `glmkit.layers.linear` (eager;
timed every repeat of the first round): the ceiling of any eager decode path built on PyTorch's GEMV kernels.

Roofline: bytes one decode step reads = every weight except the input embedding table (a step gathers B
rows of it; a tied table is read whole, as the lm_head) plus the K/V cache actually attended (P + N/2
positions on average); the share is decode tok/s / (B * bandwidth / bytes), with the READ bandwidth of a
plain `torch.sum` over a fp32 tensor far larger than the caches, at the thread count decode uses, measured
in the same run (best of 5, re-measured every repeat; the best of the run is used, printed with the median).

--bundled: the shipped default models (`default:glm`, ...; the reference loads the same directory,
`glmkit.bundled.path(family)`), default generate() and generate(compile=True) against the reference's
generate, batch 1, greedy, P=16 and N=128 unless --prompt / --new say otherwise, EOS disabled so every
implementation makes N tokens (no roofline column: a few MB of weights stay in the caches).
--stream: time per token of `glmkit.generation.stream()` at 64 and at 1024 new tokens on the bundled GLM
(the ratio should stay near 1: the incremental detokenizer costs the same per token whatever the text
length). --lookup: prompt-lookup decoding on an input-grounded task: a ~500-token Tiny Shakespeare passage
followed by its own first tokens, so that a model that has learned to copy continues the passage; plain
greedy against generate(prompt_lookup_num_tokens=10), with "same tokens" checked; it prints how much of the
greedy text repeats the passage verbatim and how many new tokens continue a bigram of the prompt (EOS is held
off with min_new_tokens here: the reference's prompt lookup needs EOS ids). --model points --stream / --lookup
at another checkpoint (the bundled models do not copy; benchmarks/copy_model.py trains one that does).

llama.cpp (optional, GLM only, batch 1): when `import llama_cpp` works and its converter is found, the
random GLM weights are saved with save_pretrained, converted to GGUF f32 and timed with the same prompt,
N and thread count beside the others (the temporary copy gets the bundled GLM tokenizer, declared GLM-4's
pre-tokenizer, and the config keys the converter reads: layernorm_epsilon, seq_length, rope_ratio,
partial_rotary_factor). The converter ships in the llama-cpp-python source distribution,
not in its wheel; to get both:

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install ./llama_cpp_python-*/      # builds llama.cpp (~10 min, 2 cores)
    glmkit bench --family glm --batch 1 --llama-cpp-src ./llama_cpp_python-*/   # or LLAMA_CPP_SRC=...

(--llama-cpp-src takes the unpacked sdist, its vendor/llama.cpp, or convert_hf_to_gguf.py itself; without
it an unpacked llama_cpp_python-* folder in the working directory is used.)
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .layers import linear

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
# --tiny: smoke tests and gpu.sh --dry-run (seconds per family; the figures mean nothing)
TINY_SHAPES = {
    "glm": dict(CPU_SHAPES["glm"], vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "persimmon": dict(CPU_SHAPES["persimmon"], vocab_size=512, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4),
    "xglm": dict(CPU_SHAPES["xglm"], vocab_size=512, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4),
}  # fmt: skip
# GPU: the real GLM-4-9B, Persimmon-8B and xglm-564M shapes (the reference configs' defaults)
GPU_SHAPES = {"glm": {}, "persimmon": {}, "xglm": dict(dropout=0.0, attention_dropout=0.0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPO = Path(__file__).resolve().parents[1]

Impl = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt ids (B, P), N) -> ids (B, P + N)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def set_threads(threads: int | None) -> int:
    """One intra-op thread per core this process may run on, unless told otherwise; decode and the
    bandwidth measurement both run at this count."""
    if not threads:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def read_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: `torch.sum` over `nbytes` of fp32 (far larger than the caches), best of
    `repeats`, at the current thread count."""
    x = torch.ones(nbytes // 4, device=device)
    x.sum()
    best = min(timed(x.sum, device) for _ in range(repeats))
    del x
    return nbytes / best


def bandwidth_bytes(device: torch.device, tiny: bool) -> int:
    return (64 << 20) if tiny else (4 << 30) if device.type == "cuda" else (1 << 30)


def step_bytes(model: Any, batch: int, context: int) -> int:
    """Bytes one decode step reads: every weight except the input embedding table (a step gathers only
    `batch` rows of it; a tied table is read whole as the lm_head), plus the K/V of `context` positions
    per row."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed or tied)
    total += 0 if tied else batch * embed[0].numel() * embed.element_size()
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return total + c.num_hidden_layers * 2 * batch * heads * head_dim * context * embed.element_size()


def build_pair(family: str, shape: dict, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(reference model, glmkit model) sharing the same random weight tensors."""
    transformers = _transformers()
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


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the benchmark compares against transformers: pip install 'glmkit[test]'") from err
    return transformers


# ---- implementations and timing ------------------------------------------------------------------------


def compile_arg(args: argparse.Namespace) -> Any:
    """What generate(compile=...) gets: True (glmkit's choice: inductor, CUDA graphs on GPU) or a backend."""
    return True if args.compile_backend == "inductor" else {"backend": args.compile_backend}


def generate_impl(model: Any, pad: int | None, keep_eos: bool = False, **extra: Any) -> Impl:
    """Greedy generate() that makes exactly N tokens: EOS disabled (eos_token_id=None), or with
    `keep_eos` forbidden until N (min_new_tokens; the reference's prompt lookup needs EOS ids)."""
    stop = dict(min_new_tokens=None) if keep_eos else dict(eos_token_id=None)

    def run(ids: torch.Tensor, n: int) -> torch.Tensor:
        if keep_eos:
            stop["min_new_tokens"] = n
        mask = torch.ones_like(ids)  # no padding; said explicitly (the reference warns when pad = EOS)
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad, **stop,
                              **extra)  # fmt: skip

    return run


def reference_compiled(ref: Any, pad: int | None, device: torch.device, backend: str) -> Impl:
    """The reference's static cache with its automatic torch.compile of the decode step (CompileConfig;
    mode "reduce-overhead", i.e. CUDA graphs, on GPU; transformers compiles on CPU only when asked)."""
    from transformers import CompileConfig

    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else "default"
    config = CompileConfig(fullgraph=False, dynamic=False, backend=backend, mode=mode)
    config._compile_all_devices = device.type != "cuda"
    return generate_impl(ref, pad, cache_implementation="static", compile_config=config)


def time_impls(impls: dict[str, Impl], ids: torch.Tensor, new: int, repeats: int, device: torch.device,
               on_repeat: Callable[[], None] = lambda: None) -> dict[str, dict]:  # fmt: skip
    """Warm every implementation up (and compile it), then time 1 and N new tokens, alternating
    implementations within each repeat. The first implementation is the one the others are divided by."""
    outputs = {name: impl(ids, new) for name, impl in impls.items()}
    times: dict[str, dict[int, list[float]]] = {name: {1: [], new: []} for name in impls}
    for _ in range(repeats):
        on_repeat()
        for n in (1, new):
            for name, impl in impls.items():
                times[name][n].append(timed(lambda f=impl, k=n: f(ids, k), device))
    B, P = ids.shape
    base = next(iter(impls))
    results = {}
    for name in impls:
        t1, tn = min(times[name][1]), min(times[name][new])
        # the same ratio repeat by repeat (runs minutes apart see different contention), median of them
        paired = [(rn - r1) / (n - o) if n > o and rn > r1 else float("nan") for r1, rn, o, n in
                  zip(times[base][1], times[base][new], times[name][1], times[name][new])]  # fmt: skip
        # a disturbed t(1) can exceed t(N) on a busy machine (small N): no decode figure then
        decode = B * (new - 1) / (tn - t1) if tn > t1 else float("nan")
        results[name] = dict(impl=name, batch=B, prefill=B * P / t1, decode=decode,
                             generate=B * new / tn, paired_ratio=_median(paired), new_tokens=outputs[name].shape[1] - P,
                             same=_same(outputs[name], outputs[base]))  # fmt: skip
    for r in results.values():
        r["ratio"] = r["decode"] / results[base]["decode"]
        r["generate_ratio"] = r["generate"] / results[base]["generate"]
    return results


def linears_seconds(model: Any, batch: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` decode steps' worth of the model's linears alone (its own weights, in the order a step
    runs them, each on a fresh one-token input through `layers.linear`, back to back): what a decode path built on
    PyTorch's matrix-vector kernels could reach if nothing else cost anything."""
    weights = [(m.weight, m.bias) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, 1, w.shape[1], device=device, dtype=w.dtype) for w, _ in weights}

    def run() -> None:
        with torch.no_grad():
            for _ in range(steps):
                for weight, bias in weights:
                    linear(inputs[weight.shape[1]], weight, bias)

    return timed(run, device)


def linears_row(family: str, batch: int, steps: int, seconds: list[float], reference: dict) -> dict:
    """The "linears only" row: decode tok/s at the best of `seconds`, against the reference's decode."""
    decode = batch * steps / min(seconds)
    nan = float("nan")
    return dict(family=family, impl="linears only", batch=batch, prefill=nan, decode=decode, paired_ratio=nan,
                generate=nan, ratio=decode / reference["decode"], generate_ratio=nan, same=None)  # fmt: skip


def _same(out: torch.Tensor, base: torch.Tensor) -> bool:
    """The base's tokens, and maybe more (the reference's prompt lookup can overshoot max_new_tokens)."""
    return out.shape[0] == base.shape[0] and out.shape[1] >= base.shape[1] and \
        torch.equal(out[:, : base.shape[1]].cpu(), base.cpu())  # fmt: skip


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def _cell(value: float, width: int, places: int) -> str:
    return f"{'-':>{width}}" if value != value else f"{value:{width}.{places}f}"  # NaN: not measured / not defined


def print_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"{'family':10} {'B':>2} {'impl':18} {'prefill tok/s':>13} {'decode tok/s':>12} {'x ref':>6} "
              f"{'paired':>6} {'generate tok/s':>14} {'x ref':>6} {'roofline':>8}  tokens = ref")  # fmt: skip
    for r in rows:
        roof = f"{r['roofline']:8.0%}" if r.get("roofline") is not None else f"{'-':>8}"
        print(f"{r['family']:10} {r['batch']:>2} {r['impl']:18} {_cell(r['prefill'], 13, 1)} {r['decode']:12.2f} "
              f"{r['ratio']:6.2f} {_cell(r['paired_ratio'], 6, 2)} {_cell(r['generate'], 14, 2)} "
              f"{_cell(r['generate_ratio'], 6, 2)} "
              f"{roof}  {'-' if r['same'] is None else 'yes' if r['same'] else 'NO'}")  # fmt: skip
    sys.stdout.flush()


class Bandwidth:
    """Read-bandwidth measurements of one run; the roofline uses the best (contention only lowers one)."""

    def __init__(self, device: torch.device, tiny: bool, threads: int) -> None:
        self.device, self.nbytes, self.threads, self.seen = device, bandwidth_bytes(device, tiny), threads, []

    def measure(self) -> None:
        self.seen.append(read_bandwidth(self.device, self.nbytes))

    def best(self) -> float:
        return max(self.seen)

    def apply(self, rows: list[dict]) -> None:
        for r in rows:
            if "step_bytes" in r:
                r["bandwidth"] = self.best()
                r["roofline"] = r["decode"] * r["step_bytes"] / (r["batch"] * self.best())

    def summary(self) -> str:
        where = "GPU" if self.device.type == "cuda" else f"{self.threads} threads"
        return (f"# read bandwidth (torch.sum over {self.nbytes >> 20} MiB fp32, {where}): best "
                f"{self.best() / 1e9:.1f} GB/s, median {statistics.median(self.seen) / 1e9:.1f} GB/s over "
                f"{len(self.seen)} measurements ({', '.join(f'{b / 1e9:.1f}' for b in self.seen)}); "
                f"the roofline uses the best (at the median every roofline share would be "
                f"x{self.best() / statistics.median(self.seen):.2f})")  # fmt: skip


# ---- random weights ----------------------------------------------------------------------------------


def run_family(family: str, args: argparse.Namespace, device: torch.device, bw: Bandwidth) -> list[dict]:
    """Every implementation on one family's random weights; rows are printed as each batch finishes."""
    shapes = TINY_SHAPES if args.tiny else DEEP_SHAPES if args.deep else GPU_SHAPES if device.type == "cuda" \
        else CPU_SHAPES  # fmt: skip
    ref, ours = build_pair(family, shapes[family], DTYPES[args.dtype], device)
    pad = 0
    impls: dict[str, Impl] = {"reference": generate_impl(ref, pad)}
    if args.ref_compile and getattr(ref, "_can_compile_fullgraph", False):
        impls["reference compiled"] = reference_compiled(ref, pad, device, args.compile_backend)
    elif args.ref_compile:  # XGLM: the reference has no static cache for it
        print(f"# reference compiled: {type(ref).__name__} does not support a static cache / torch.compile")
    impls["glmkit"] = generate_impl(ours, pad)
    impls["glmkit static"] = generate_impl(ours, pad, cache_implementation="static")
    if args.compile:
        impls["glmkit compiled"] = generate_impl(ours, pad, compile=compile_arg(args))
    if family == "glm" and args.llama_cpp != "off":
        impls.update(llama_impls(ours, args, device))
    # eager rows first, then the compiled ones (against the reference again): a timeout during a long
    # compile (gpu.sh) still leaves the first group's figures
    eager = {name: impl for name, impl in impls.items() if "compiled" not in name}
    compiled = {name: impl for name, impl in impls.items() if "compiled" in name}
    rows = []
    for batch in args.batch:
        ids = torch.randint(3, ours.config.vocab_size, (batch, args.prompt), device=device,
                            generator=torch.Generator(device).manual_seed(batch))  # fmt: skip
        need = step_bytes(ours, batch, args.prompt + args.new // 2)
        llama = {name: impl for name, impl in eager.items() if name.startswith("llama")}  # timed again beside them
        groups = [eager] + ([{"reference": impls["reference"], **compiled, **llama}] if compiled else [])
        for first, group in zip((True, False), groups):
            group = {name: impl for name, impl in group.items() if batch == 1 or not name.startswith("llama")}
            linears: list[float] = []  # timed beside the others, every repeat of the eager round

            def on_repeat(linears: list[float] = linears, first: bool = first, batch: int = batch) -> None:
                bw.measure()
                if first:
                    linears.append(linears_seconds(ours, batch, args.new - 1, device))

            results = time_impls(group, ids, args.new, args.repeats, device, on_repeat)
            fresh = [dict(family=family, step_bytes=need, **r) for r in results.values()]
            if first:
                fresh.append(dict(linears_row(family, batch, args.new - 1, linears, results["reference"]),
                                  step_bytes=need))  # fmt: skip
            else:  # the second round: the compiled rows' "x ref" divides by the reference's time in it
                for row in fresh:
                    row["impl"] += "" if "compiled" in row["impl"] else ", again"
            bw.apply(fresh)
            print_rows(fresh, header=first)
            rows += fresh
    return rows


# ---- llama.cpp -----------------------------------------------------------------------------------------


def find_gguf_converter(source: str | None) -> Path | None:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist: `source` (or $LLAMA_CPP_SRC) may be the
    unpacked sdist, its vendor/llama.cpp or the script; else an unpacked llama_cpp_python-* here."""
    roots = [source or os.environ.get("LLAMA_CPP_SRC")] if (source or os.environ.get("LLAMA_CPP_SRC")) else []
    roots += sorted(glob.glob("llama_cpp_python-*"), reverse=True)
    try:  # an editable / source install keeps the vendor folder next to the package
        import llama_cpp

        roots.append(str(Path(llama_cpp.__file__).resolve().parents[1]))
    except ImportError:
        pass
    for root in roots:
        path = Path(root)
        for candidate in (path, path / "convert_hf_to_gguf.py", path / "vendor/llama.cpp/convert_hf_to_gguf.py"):
            if candidate.is_file() and candidate.name == "convert_hf_to_gguf.py":
                return candidate
    return None


# Runs the converter with the bundled GLM tokenizer's pre-tokenizer taken as GLM-4's: it is trained on other
# text, so llama.cpp's hash table of known tokenizers does not know it, but its regex is GLM-4's.
_CONVERT = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"
import convert_hf_to_gguf as convert
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert.main()
"""


def convert_to_gguf(model: Any, converter: Path, out_dir: str, context: int) -> Path:
    """save_pretrained + the bundled GLM tokenizer + the keys llama.cpp's GLM converter reads, then
    convert_hf_to_gguf.py --outtype f32. Returns the .gguf path."""
    import glmkit.bundled

    hf_dir = Path(out_dir) / "hf"
    model.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(glmkit.bundled.path("glm") / name, hf_dir / name)
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(layernorm_epsilon=config["rms_norm_eps"], seq_length=max(context, 256),
                  rope_ratio=config.get("rope_theta", 10000.0) / 10000.0,
                  partial_rotary_factor=config.get("partial_rotary_factor", 0.5))  # fmt: skip
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    gguf = Path(out_dir) / "model-f32.gguf"
    cmd = [sys.executable, "-c", _CONVERT, str(converter.parent), str(hf_dir), "--outtype", "f32", "--outfile",
           str(gguf)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {done.stderr.strip().splitlines()[-1:]}")
    return gguf


# llama.cpp's file types for `llama_model_quantize` (include/llama.h: LLAMA_FTYPE_MOSTLY_*)
LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2}


def llama_impls(model: Any, args: argparse.Namespace, device: torch.device, quants: tuple[str, ...] = ("f32",)
                ) -> dict[str, Impl]:  # fmt: skip
    """llama.cpp on the same weights, greedy, batch 1, at the benchmark's thread count: the weights converted to
    GGUF f32 once, then quantized by llama.cpp itself to each of `quants` ("f32", "q8_0", "q4_0"; its defaults,
    so q8_0 / q4_0 quantize the output matrix too). Named "llama.cpp <quant>"; empty (with a line saying why)
    when llama-cpp-python or its converter is missing or a step fails."""
    if device.type != "cpu" or model.dtype != torch.float32:
        return {}
    try:
        import llama_cpp
    except ImportError:
        if args.llama_cpp == "on":
            raise
        print("# llama.cpp: not installed (optional: see `python -m glmkit.bench --help`)")
        return {}
    converter = find_gguf_converter(args.llama_cpp_src)
    if converter is None:
        print("# llama.cpp: convert_hf_to_gguf.py not found: pass --llama-cpp-src (the unpacked sdist)")
        return {}
    context = args.prompt + args.new + 8
    threads = torch.get_num_threads()
    tmp = tempfile.mkdtemp(prefix="glmkit-gguf-")
    impls = {}
    try:
        f32 = convert_to_gguf(model, converter, tmp, context)
        for quant in quants:
            path = f32
            if quant != "f32":
                path = f32.with_name(f"model-{quant}.gguf")
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype, params.nthread = LLAMA_FTYPES[quant], threads
                if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) != 0:
                    raise RuntimeError(f"llama_model_quantize to {quant} failed")
            llm = llama_cpp.Llama(str(path), n_ctx=context, n_batch=max(args.prompt, 8), n_threads=threads,
                                  n_threads_batch=threads, verbose=False)  # fmt: skip
            impls[f"llama.cpp {quant}"] = _llama_run(llm)
    except Exception as err:  # noqa: BLE001 - an optional comparison must not stop the benchmark
        print(f"# llama.cpp: skipped: {type(err).__name__}: {err}")
        return {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # llama.cpp has read (or mapped) the files by now
    print(f"# llama.cpp {llama_cpp.__version__} ({converter}), GGUF {' / '.join(quants)}, {threads} threads")
    return impls


def _llama_run(llm: Any) -> Impl:
    import numpy as np
    from llama_cpp import llama_get_logits_ith

    vocab = llm.n_vocab()

    def run(ids: torch.Tensor, n: int) -> torch.Tensor:
        if ids.shape[0] != 1:
            raise ValueError("the llama.cpp side runs batch 1 only")
        llm.reset()
        llm.eval(ids[0].tolist())
        out: list[int] = []
        for _ in range(n):  # greedy on the last position's logits (what llama_decode computed)
            logits = np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            out.append(int(logits.argmax()))
            if len(out) < n:
                llm.eval([out[-1]])
        return torch.cat([ids.cpu(), torch.tensor([out])], dim=1)

    return run


# ---- the bundled models --------------------------------------------------------------------------------


def load_models(source: str, device: torch.device, dtype: torch.dtype, reference: bool = True) -> tuple:
    """(glmkit model, reference model or None, tokenizer) of a checkpoint: `default:FAMILY` (a bundled
    model; the reference loads the same directory) or a local directory."""
    import glmkit
    import glmkit.bundled

    directory = str(glmkit.bundled.path(source.split(":", 1)[1] or "glm")) if source.startswith("default:") else source
    ours = glmkit.AutoModelForCausalLM.from_pretrained(source).to(device=device, dtype=dtype).eval()
    ref = None
    if reference:
        ref = _transformers().AutoModelForCausalLM.from_pretrained(directory).to(device=device, dtype=dtype).eval()
    return ours, ref, glmkit.AutoTokenizer.from_pretrained(source)


def run_bundled(args: argparse.Namespace, device: torch.device, bw: Bandwidth) -> list[dict]:
    """Default generate() and generate(compile=True) against the reference's generate on the bundled
    weights: batch 1, greedy, EOS disabled."""
    rows = []
    for family in args.family:
        ours, ref, _ = load_models(f"default:{family}", device, DTYPES[args.dtype])
        pad = ours.config.pad_token_id
        impls = {"reference": generate_impl(ref, pad), "glmkit": generate_impl(ours, pad)}
        if not args.no_compile:
            impls["glmkit compiled"] = generate_impl(ours, pad, compile=compile_arg(args))
        vocab = ours.config.vocab_size - 16  # the special tokens sit at the top of the bundled vocabularies
        ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)
        results = time_impls(impls, ids, args.new, args.repeats, device, bw.measure)
        # no roofline: a few MB of weights stay in the CPU caches, so DRAM bandwidth bounds nothing here
        family_rows = [dict(family=f"{family}*", **r) for r in results.values()]
        print_rows(family_rows)
        rows += family_rows
    return rows


def run_stream(args: argparse.Namespace, device: torch.device) -> dict:
    """Time per token of stream() (with the tokenizer's text) at a short and a long length."""
    from glmkit.generation import stream

    model, _, tok = load_models(args.model, device, DTYPES[args.dtype], reference=False)
    ids = tok("ROMEO:", return_tensors="pt")["input_ids"].to(device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=model.config.pad_token_id)

    def streamed(n: int) -> int:
        return sum(len(c.token_ids[0]) for c in stream(model, ids, tokenizer=tok, max_new_tokens=n, **kwargs))

    short, long = args.stream_lengths
    streamed(short)  # warm-up
    per_token: dict[str, dict[int, float]] = {"stream": {}, "generate": {}}
    made = {}
    for _ in range(args.repeats):
        for n in (short, long):
            start = time.perf_counter()
            made[n] = streamed(n)
            t = time.perf_counter() - start
            per_token["stream"][n] = min(per_token["stream"].get(n, float("inf")), t / n)
            t = timed(lambda k=n: model.generate(ids, max_new_tokens=k, **kwargs), device)
            per_token["generate"][n] = min(per_token["generate"].get(n, float("inf")), t / n)
    ratio = per_token["stream"][long] / per_token["stream"][short]
    for what, times in per_token.items():
        print(f"{what:8} ms/token: {short} new {times[short] * 1e3:.3f}, {long} new {times[long] * 1e3:.3f}")
    print(f"stream per-token time ratio {long}/{short}: {ratio:.2f} (target <= 1.2); tokens streamed: "
          f"{made[short]} and {made[long]}")  # fmt: skip
    sys.stdout.flush()
    return dict(mode="stream", per_token=per_token, ratio=ratio, tokens=made)


def find_text(path: str | None) -> Path | None:
    """Tiny Shakespeare: --text, else data/ in the repository, else ../shared/data beside it."""
    candidates = [Path(path)] if path else []
    for base in (REPO, Path.cwd()):
        candidates += [base / "data" / "tinyshakespeare.txt", base.parent / "shared" / "data" / "tinyshakespeare.txt"]
    return next((c for c in candidates if c.is_file()), None)


def verbatim_share(tokenizer: Any, new: list[int], passage: list[int]) -> float:
    """Share of the new tokens' text that repeats the passage's text from its start, compared as text: a copy may
    split the same characters into other tokens than the passage's tokenization."""
    made = tokenizer.decode(new)
    return len(os.path.commonprefix([made, tokenizer.decode(passage)])) / max(len(made), 1)


def bigram_continuations(prompt: list[int], new: list[int]) -> tuple[float, float]:
    """Shares of the new tokens whose (previous token, token) pair occurs in the prompt, and in the prompt or the
    new tokens before it: what prompt lookup can draft right (from the input, or from the model's own loops)."""
    text = prompt + new
    in_prompt = set(zip(prompt, prompt[1:]))
    seen, hits_prompt, hits_any = set(in_prompt), 0, 0
    for i in range(len(prompt), len(text)):
        pair = (text[i - 1], text[i])
        hits_prompt += pair in in_prompt
        hits_any += pair in seen
        seen.add(pair)
    return hits_prompt / max(len(new), 1), hits_any / max(len(new), 1)


def run_lookup(args: argparse.Namespace, device: torch.device) -> dict:
    """Prompt-lookup decoding where the answer is in the prompt: passage + its first tokens, greedy."""
    text = find_text(args.text)
    if text is None:
        print("lookup: no tinyshakespeare.txt found (pass --text FILE): skipped")
        return dict(mode="lookup", available=False)
    ours, ref, tok = load_models(args.model, device, DTYPES[args.dtype])
    prefix = len(tok("")["input_ids"])  # [gMASK]<sop>
    ids = tok(text.read_text()[: 20 * args.passage_tokens], return_tensors="pt")["input_ids"]
    passage = ids[:, : prefix + args.passage_tokens]
    prompt = torch.cat([passage, passage[:, prefix : prefix + 8]], dim=1).to(device)
    new = args.new
    pad = ours.config.pad_token_id
    impls = {"glmkit": generate_impl(ours, pad, True), "reference": generate_impl(ref, pad, True)}
    lookup = {"glmkit lookup": generate_impl(ours, pad, True, prompt_lookup_num_tokens=10),
              "reference lookup": generate_impl(ref, pad, True, prompt_lookup_num_tokens=10)}  # fmt: skip
    for name, impl in lookup.items():
        try:
            impl(prompt, 2)
            impls[name] = impl
        except (TypeError, NotImplementedError, ValueError) as err:
            print(f"lookup: {name}: not available ({type(err).__name__}: {str(err)[:120]})")
    results = time_impls(impls, prompt, new, args.repeats, device)
    plain = impls["glmkit"](prompt, new)[0, prompt.shape[1] :].cpu()
    copied = verbatim_share(tok, plain.tolist(), passage[0, prefix + 8 :].tolist())
    from_prompt, from_any = bigram_continuations(prompt[0].tolist(), plain.tolist())
    print(f"lookup: {prompt.shape[1]}-token prompt ({args.passage_tokens}-token passage + its first 8 tokens), "
          f"N={new}, greedy repeats the passage verbatim for {copied:.0%} of its text; {from_prompt:.0%} of the new "
          f"tokens continue a bigram of the prompt, {from_any:.0%} of it or of the text before")  # fmt: skip
    if from_prompt < 0.5:
        print(f"lookup: note: {args.model} does not copy from the prompt, so this is not the input-grounded case "
              "the target is about (pass --model with a checkpoint that copies: benchmarks/copy_model.py); where "
              "the second share is much higher than the first, lookup's gain comes from the model repeating "
              "itself")  # fmt: skip
    for name, r in results.items():
        over = f" (made {r['new_tokens']} tokens for max_new_tokens={new})" if r["new_tokens"] != new else ""
        print(f"lookup: {name:16} {r['generate']:9.1f} tok/s  x glmkit {r['generate_ratio']:5.2f}  "
              f"tokens = glmkit: {'yes' if r['same'] else 'NO'}{over}")  # fmt: skip
    if "glmkit lookup" in results:
        r = results["glmkit lookup"]
        print(f"lookup: prompt_lookup_num_tokens=10 vs plain greedy: {r['generate_ratio']:.2f}x (target >= 1.8), "
              f"same tokens: {'yes' if r['same'] else 'NO'}")  # fmt: skip
    else:
        print("lookup: prompt_lookup_num_tokens=10 vs plain greedy: not available")
    sys.stdout.flush()
    return dict(mode="lookup", available="glmkit lookup" in results, copied=copied, from_prompt=from_prompt,
                from_any=from_any, rows=list(results.values()))


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
    shapes = TINY_SHAPES if args.tiny else CPU_SHAPES
    for family in args.family:
        config = getattr(glmkit, FAMILIES[family][0])(**shapes[family])
        model = getattr(glmkit, FAMILIES[family][2])(config)
        tiny = getattr(glmkit, FAMILIES[family][0])(**{**shapes[family], "vocab_size": 64})
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


# ---- entry point --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmkit bench", description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring (glmkit/bench.py) for the method.")  # fmt: skip
    parser.add_argument("--family", nargs="+", default=sorted(FAMILIES), choices=sorted(FAMILIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt", type=int, default=None, help="prompt length P (default 128; 16 for --bundled)")
    parser.add_argument("--new", type=int, default=None,
                        help="new tokens N (default 32 CPU, 128 GPU; 128 for --bundled / --lookup)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores available)")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument("--ref-compile", action="store_true",
                        help="also time the reference's static cache + torch.compile (CompileConfig)")  # fmt: skip
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for both compiled rows (e.g. eager: fast smoke runs)")  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="--bundled: skip the compiled row")
    parser.add_argument("--load", action="store_true", help="measure checkpoint loading instead")
    parser.add_argument("--deep", action="store_true", help="40 narrow layers: the host-overhead-bound regime")
    parser.add_argument("--tiny", action="store_true", help="tiny random shapes (smoke runs; figures mean nothing)")
    parser.add_argument("--bundled", action="store_true", help="the bundled default models vs the reference")
    parser.add_argument("--stream", action="store_true", help="stream() time per token, short vs long (bundled GLM)")
    parser.add_argument("--stream-lengths", nargs=2, type=int, default=[64, 1024], metavar=("SHORT", "LONG"))
    parser.add_argument("--lookup", action="store_true", help="prompt-lookup decoding on a copy task (bundled GLM)")
    parser.add_argument("--model", default="default:glm",
                        help="--stream / --lookup checkpoint: default:FAMILY or a local directory")  # fmt: skip
    parser.add_argument("--passage-tokens", type=int, default=500, help="--lookup passage length")
    parser.add_argument("--text", default=None, help="--lookup text file (default: tinyshakespeare.txt)")
    parser.add_argument("--llama-cpp", choices=("auto", "on", "off"), default="auto",
                        help="the llama.cpp side (random GLM, CPU fp32, batch 1): auto = when importable")  # fmt: skip
    parser.add_argument("--llama-cpp-src", default=None,
                        help="the unpacked llama-cpp-python sdist (or its convert_hf_to_gguf.py); "
                        "default $LLAMA_CPP_SRC")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--load-child", nargs=3, help=argparse.SUPPRESS)
    return parser


def run_engine_modes(args: argparse.Namespace, device: torch.device, bw: Bandwidth) -> list[dict]:
    """--bundled / --stream / --lookup, in that order, in one process."""
    rows: list[dict] = []
    if args.bundled:
        print(f"# bundled models (*), batch 1, greedy, EOS disabled, P={args.prompt}, N={args.new} "
              "(targets: glmkit >= 5x reference, compiled >= 10x, on generate tok/s)")  # fmt: skip
        rows += run_bundled(args, device, bw)
    if args.stream:
        rows.append(run_stream(args, device))
    if args.lookup:
        rows.append(run_lookup(args, device))
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # `glmkit bench serve ...`: load on the OpenAI server (glmkit/serve/bench.py)
        from .serve.bench import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.load_child:
        load_child(*args.load_child)
        return 0
    threads = set_threads(args.threads)
    if args.load:
        rows = run_load(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    device = torch.device(args.device)
    engine = args.bundled or args.stream or args.lookup
    args.prompt = args.prompt or (16 if engine else 128)
    args.new = args.new or (128 if engine or device.type == "cuda" else 32)
    bw = Bandwidth(device, args.tiny, threads)
    bw.measure()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} threads"
    print(f"# {name}, {args.dtype}, P={args.prompt}, N={args.new}, torch {torch.__version__}")
    rows: list[dict] = []
    try:
        if engine:
            rows = run_engine_modes(args, device, bw)
        else:
            for family in args.family:
                rows += run_family(family, args, device, bw)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:  # gpu.sh's per-step timeout: keep what was measured
        print("# interrupted: the figures so far follow")
    table = [r for r in rows if "decode" in r]
    if table:
        bw.apply(table)
        print(bw.summary())
        if len({(r["family"], r["batch"]) for r in table}) > 1:
            print("# final table (roofline shares at the best bandwidth of the whole run):")
            print_rows(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
