"""`glmkit quantize IN OUT`: a quantized checkpoint that `from_pretrained(OUT)` loads with no flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .quantize import METHODS, QuantSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="checkpoint directory, hub id or default:glm|xglm|persimmon")
    parser.add_argument("out", help="directory to write the quantized checkpoint to")
    parser.add_argument("--method", required=True, choices=METHODS, help="int8 per channel or int4 per group")
    parser.add_argument("--group-size", type=int, help="int4 group size: 32, 64 or 128 (default 128)")
    parser.add_argument("--include-embeddings", action="store_true", help="also int8 the input embeddings")
    parser.add_argument("--include-lm-head", action="store_true", help="also quantize lm_head")
    parser.add_argument("--dtype", default="auto",
                        help="dtype of scales and the rest: auto (the checkpoint's), bfloat16 (fast on CPU), float32")
    parser.add_argument("--max-shard-size", default="5GB", help="shard the weights past this size (e.g. 2GB)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT")


def quantize_checkpoint(src: str, out: str | Path, spec: QuantSpec, dtype: str = "auto", force: bool = False,
                        max_shard_size: str = "5GB", **hub: Any) -> Any:  # fmt: skip
    """Load `src` quantized (linear by linear, never whole in full precision), save it to `out` with the
    tokenizer files beside it; return the model."""
    from ..auto import AutoModelForCausalLM
    from ..checkpoint import check_writable_output, copy_file_atomic
    from ..hub import is_tokenizer_file, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(src, **hub)
    out = Path(out)
    if out.resolve() == directory.resolve():
        raise ValueError("quantize writes a new directory; OUT must differ from IN")
    check_writable_output(out, force)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization=spec)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    for file in sorted(directory.iterdir()):
        if file.is_file() and is_tokenizer_file(file.name):
            copy_file_atomic(file, out / file.name)
    return model


def run(args: argparse.Namespace) -> int:
    spec = QuantSpec(args.method, args.group_size, args.include_embeddings, args.include_lm_head)
    model = quantize_checkpoint(args.src, args.out, spec, args.dtype, args.force, args.max_shard_size)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"wrote {type(model).__name__} quantized {spec.method}"
          f"{f' (group size {spec.group_size})' if spec.group_size else ''} to {args.out}: "
          f"{size / 1e6:.1f} MB of weights")  # fmt: skip
    return 0
