"""LoRA fine-tuning benchmark: training tokens/s of full fine-tuning, LoRA and QLoRA (int8 base) on the bundled
models, and the same LoRA step in peft on the transformers model (the reference), side by side.

Each implementation runs `--steps` AdamW steps on the same (batch, block) random-token batches after 2 warm-up
steps; every repeat runs each implementation once, alternating, and the best repeat counts. LoRA is rank 8 on
every linear but the head ("all-linear"), fp32 on CPU.

    python benchmarks/lora.py [--quick] [--families glm xglm persimmon] [--batch 8] [--block 128] [--steps 4]
    python benchmarks/lora.py --demo    # a LoRA chat fine-tune of the bundled GLM: held-out loss before / after

--demo builds a chat set from data/tinyshakespeare.txt (user: a line of the play; assistant: the next line),
holds out the last tenth, and runs `glmkit.train` with lora=True; it prints the held-out loss (assistant
tokens only) before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from glmkit import AutoModelForCausalLM, bundled, lora
from glmkit.bench import set_threads

REPO = Path(__file__).resolve().parents[1]


def _step_fn(model: torch.nn.Module, batch: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def implementations(family: str, batch: torch.Tensor) -> dict:
    directory = bundled.path(family)
    base = AutoModelForCausalLM.from_pretrained(directory)
    impls = {
        "full fine-tune": _step_fn(copy.deepcopy(base), batch),
        "glmkit LoRA r8": _step_fn(lora.apply(copy.deepcopy(base), rank=8, target_modules="all"), batch),
        "glmkit QLoRA int8 r8": _step_fn(
            lora.apply(AutoModelForCausalLM.from_pretrained(directory, quantization="int8"), 8, target_modules="all"),
            batch,
        ),
    }
    try:
        import peft
        import transformers
    except ImportError:
        return impls
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    impls["peft LoRA r8 (reference)"] = _step_fn(peft.get_peft_model(ref, config), batch)
    return impls


def time_steps(impls: dict, steps: int, repeats: int) -> dict[str, float]:
    """Best seconds per step of each implementation (2 warm-up steps each, then alternating repeats)."""
    for step in impls.values():
        step(), step()
    best = {name: float("inf") for name in impls}
    for _ in range(repeats):
        for name, step in impls.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            best[name] = min(best[name], (time.perf_counter() - t0) / steps)
    return best


def benchmark(args: argparse.Namespace) -> None:
    for family in args.families:
        vocab = AutoModelForCausalLM.from_pretrained(bundled.path(family)).config.vocab_size
        batch = torch.randint(4, vocab, (args.batch, args.block), generator=torch.Generator().manual_seed(0))
        best = time_steps(implementations(family, batch), args.steps, args.repeats)
        full = best["full fine-tune"]
        print(f"\n{family}: batch {args.batch} x {args.block} tokens, {args.steps} steps, best of {args.repeats}")
        for name, seconds in best.items():
            print(f"  {name:28s} {batch.numel() / seconds:10,.0f} tok/s   {full / seconds:5.2f}x full fine-tune")


def chat_set(path: Path, out: Path, limit: int) -> Path:
    """user: a line of the play; assistant: the line after it (JSONL)."""
    lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if len(x.strip()) > 20][:limit]
    rows = [{"messages": [{"role": "user", "content": f"Continue: {a}"}, {"role": "assistant", "content": b}]}
            for a, b in zip(lines, lines[1:])]  # fmt: skip
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def demo(args: argparse.Namespace) -> None:
    from glmkit.tokenization import AutoTokenizer
    from glmkit.train import TrainOptions, evaluate, make_datasets, read_records, train

    base = bundled.path("glm")
    work = Path(tempfile.mkdtemp(prefix="glmkit-lora-demo-"))
    data = chat_set(REPO / "data" / "tinyshakespeare.txt", work / "chat.jsonl", args.demo_lines)
    steps = args.demo_steps
    opts = TrainOptions(data=data, out=work / "adapter", model=base, lora=True, rank=16, alpha=32, max_steps=steps,
                        batch_size=16, block_size=128, lr=2e-3, warmup_steps=10, eval_fraction=0.1, eval_every=steps,
                        log_every=20)  # fmt: skip
    _, held_out, _ = make_datasets(read_records(data), AutoTokenizer.from_pretrained(base), opts)
    before = evaluate(AutoModelForCausalLM.from_pretrained(base), held_out, 16, torch.device("cpu"))
    t0 = time.perf_counter()
    result = train(opts)
    print(f"\nLoRA r16 (all linears) on the bundled GLM, {args.demo_steps} steps x 16 conversations, "
          f"{time.perf_counter() - t0:.0f}s: held-out loss ({len(held_out)} conversations, assistant tokens) "
          f"{before:.3f} -> {result.eval_loss:.3f}; adapter in {result.out}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["glm", "xglm", "persimmon"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="GLM only, 2 steps, 2 repeats")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--demo", action="store_true", help="the LoRA chat fine-tune demo instead")
    parser.add_argument("--demo-steps", type=int, default=200)
    parser.add_argument("--demo-lines", type=int, default=3000)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.quick:
        args.families, args.steps, args.repeats = ["glm"], 2, 2
    demo(args) if args.demo else benchmark(args)


if __name__ == "__main__":
    main()
