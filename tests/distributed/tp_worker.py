"""One rank of a tensor-parallel test run (launched by test_tp.py through torchrun, gloo on CPU).

argv: checkpoint root, output directory[, "compiled"]. Every check of one world size runs in this one launch (a
launch costs seconds); rank r writes its results to out/<name>.rank<r>.safetensors and out/rank<r>.json,
and the test process compares them with the single-process model.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

import glmkit

FAMILIES = ("glm", "xglm", "persimmon")
CHECKPOINTS = (*FAMILIES, "glm_original")  # the last: the GLM in the THUDM release layout (fused q/k/v)
NEW_TOKENS = 6


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """The batch every run uses: two rows, the second left-padded."""
    ids = torch.tensor([[5, 17, 42, 8, 23, 61, 30], [0, 0, 12, 77, 3, 40, 9]])
    return ids, (ids != 0).long()


def load(family: str, root: Path, world: int) -> glmkit.PreTrainedModel:
    """Each family through another way of asking for tensor parallelism."""
    options = {"glm": {"tp_plan": "auto"}, "glm_original": {"tp_plan": "auto"}, "xglm": {"tp_size": world},
               "persimmon": {"device_mesh": init_device_mesh("cpu", (world,))}}[family]  # fmt: skip
    return glmkit.AutoModelForCausalLM.from_pretrained(root / family, **options)


def run_family(family: str, root: Path, out: Path, rank: int, world: int) -> None:
    model = load(family, root, world)
    ids, mask = inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            cache_implementation="static")  # fmt: skip
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0,
                             temperature=2.0)  # fmt: skip
    streamed = torch.tensor([chunk.token_ids[0][0] for chunk in model.stream(ids[:1], max_new_tokens=NEW_TOKENS,
                                                                              do_sample=False)])  # fmt: skip
    results = {"logits": logits.contiguous(), "greedy": greedy, "static": static, "stream": streamed}
    save_file({**results, "sampled": sampled}, str(out / f"{family}.rank{rank}.safetensors"))
    model.save_pretrained(out / f"saved_{family}")


SERVED = "default:glm"  # the bundled GLM (4 query / 2 kv heads) and its tokenizer
SERVE_REQUESTS = [("ROMEO:", dict(max_tokens=8, temperature=0.0, ignore_eos=True)),
                  ("JULIET: O Romeo, Romeo", dict(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True)),
                  ("KING", dict(max_tokens=6, temperature=1.0, top_k=20, seed=7, stop=["e"]))]  # fmt: skip


def serve_requests(model: glmkit.PreTrainedModel, tokenizer: object, lead: object = None) -> dict[str, list[int]]:
    """Run SERVE_REQUESTS through a scheduler of two rows (the third waits for a free one); tokens by request."""
    from glmkit.serve.scheduler import Request, SamplingParams, Scheduler

    scheduler, tokens, finished = Scheduler(model, tokenizer, max_num_seqs=2), {}, []
    done = threading.Event()

    def on_event(event: object) -> None:
        tokens.setdefault(event.request_id, []).extend(event.token_ids)
        if event.finish_reason is not None:
            finished.append(event.request_id)
            if len(finished) == len(SERVE_REQUESTS):
                done.set()

    if lead is not None:
        lead(scheduler)
    scheduler.start()
    for i, (prompt, params) in enumerate(SERVE_REQUESTS):
        scheduler.submit(Request(tokenizer(prompt)["input_ids"], SamplingParams(**params), on_event, str(i)))
    done.wait(120)
    scheduler.stop()
    return tokens


def served(out: Path, rank: int) -> None:
    """Rank 0 serves SERVE_REQUESTS; the other ranks follow its steps until it stops."""
    from glmkit.distributed.serve import follow, lead
    from glmkit.serve.scheduler import Scheduler

    model = glmkit.AutoModelForCausalLM.from_pretrained(SERVED, tp_plan="auto")
    tokenizer = glmkit.AutoTokenizer.from_pretrained(SERVED)
    if rank:
        return follow(Scheduler(model, tokenizer, max_num_seqs=2))
    (out / "served.json").write_text(json.dumps(serve_requests(model, tokenizer, lead)))


def kb(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field + ":")).split()[1])


def peak_memory(root: Path) -> dict:
    """Peak resident growth while loading the larger checkpoint, against the bytes this rank holds."""
    gc.collect()
    base = kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    model = glmkit.GlmForCausalLM.from_pretrained(root / "big", tp_plan="auto")
    params = {id(p): p for p in model.parameters()}.values()
    held = sum(p.numel() * p.element_size() for p in params)
    return {"peak": (kb("VmHWM") - base) * 1024, "held": held}


def errors(root: Path, world: int) -> dict:
    """The message of each misuse (every rank must raise the same, before any collective)."""
    cases = {
        "heads": lambda: glmkit.XGLMForCausalLM.from_pretrained(root / "xglm_3_heads", tp_plan="auto"),
        "device_map": lambda: glmkit.GlmForCausalLM.from_pretrained(root / "glm", tp_plan="auto", device_map="cpu"),
        "tp_size": lambda: glmkit.GlmForCausalLM.from_pretrained(root / "glm", tp_size=world + 1),
        "quantization": lambda: glmkit.GlmForCausalLM.from_pretrained(root / "glm", tp_plan="auto",
                                                                      quantization="int8"),
    }  # fmt: skip
    found = {}
    for name, call in cases.items():
        try:
            call()
            found[name] = None
        except Exception as err:  # noqa: BLE001 - the test checks the type and the words
            found[name] = f"{type(err).__name__}: {err}"
    return found


def compiled(root: Path, out: Path, rank: int, world: int) -> None:
    """Greedy tokens through the compiled step (collectives traced into the graph) and its warnings."""
    model = load("glm", root, world)
    ids, mask = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, compile=True)
    save_file({"compiled": tokens}, str(out / f"compiled.rank{rank}.safetensors"))
    (out / f"compiled.rank{rank}.json").write_text(json.dumps([str(w.message) for w in caught]))


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1000 + rank)  # loading must bring every rank's RNG into line
    if sys.argv[3:] == ["compiled"]:
        compiled(root, out, rank, world)
        return dist.destroy_process_group()
    for family in CHECKPOINTS:
        run_family(family, root, out, rank, world)
    served(out, rank)
    report = {"errors": errors(root, world), "memory": peak_memory(root)}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
