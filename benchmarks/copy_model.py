"""Train a small GLM that copies, for `glmkit bench --lookup --model DIR` (prompt lookup's input-grounded case).

The bundled models were trained on 128-token blocks and repeat only 1-4 % of a 500-token passage, so prompt
lookup on them measures the engine's overhead, not the case it is for. Fine-tuning the bundled GLM on
`passage + passage` did not make it copy (RESULTS.md, session 10); this does, in ~36 minutes on 2 CPU cores
(the runs RESULTS.md measured):

    python benchmarks/copy_model.py --out /tmp/glm-copy-short --minutes 12
    python benchmarks/copy_model.py --out /tmp/glm-copy-long --init /tmp/glm-copy-short --minutes 9 \\
        --min-len 128 --max-len 520 --batch 4 --lr 5e-4
    python benchmarks/copy_model.py --out /tmp/glm-copy --init /tmp/glm-copy-long --minutes 15 \\
        --min-len 128 --max-len 520 --batch 4 --lr 5e-4
    glmkit bench --lookup --model /tmp/glm-copy

The first run trains the bundled GLM's shape with 2 layers from scratch on random ids repeated twice (8-96 ids): the
loss sits at ln(vocab) for ~2,500 steps, then an induction circuit forms and the second copy costs ~nothing.
Then it is stretched to 128-520-token passages, half of them Tiny Shakespeare after its first 10 % (natural
text repeats short n-grams, which random ids never taught it to look past); the bench's passage is the start
of the text, held out. It prints how much of that passage greedy decoding repeats as it goes.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from glmkit import AutoTokenizer, GlmConfig, GlmForCausalLM, bundled
from glmkit.bench import find_text, verbatim_share


def copy_batch(batch: int, lengths: tuple[int, int], vocab: int, text: torch.Tensor | None,
               gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """(batch, 2n) rows of a passage and the same passage again, n drawn from `lengths` per batch: random ids,
    and with `text`, every other row a passage of it (after its first 10 %)."""
    n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=gen))
    passages = torch.randint(0, vocab, (batch, n), generator=gen)
    if text is not None:
        for row in range(0, batch, 2):
            start = int(torch.randint(len(text) // 10, len(text) - n, (1,), generator=gen))
            passages[row] = text[start : start + n]
    return torch.cat([passages, passages], dim=1)


@torch.no_grad()
def copy_share(model: GlmForCausalLM, tokenizer: Any, passage: torch.Tensor, cue: int = 8, new: int = 64) -> float:
    """Share of the greedy text after `passage + passage[:cue]` that repeats the passage verbatim (the bench's task
    and measure)."""
    prompt = torch.cat([passage, passage[:cue]])[None]
    out = model.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None)[0, prompt.shape[1] :]
    return verbatim_share(tokenizer, out.tolist(), passage[cue:].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the checkpoint (config, weights, tokenizer)")
    parser.add_argument("--init", default=None, help="continue from this checkpoint (stage 2)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    parser.add_argument("--layers", type=int, default=2, help="layers of a model trained from scratch")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-len", type=int, default=8, help="shortest passage")
    parser.add_argument("--max-len", type=int, default=96, help="longest passage")
    args = parser.parse_args()
    text_file = find_text(None)
    if text_file is None:
        raise SystemExit("no tinyshakespeare.txt found (data/ or ../shared/data)")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(bundled.path("glm"))
    if args.init is None:
        model = GlmForCausalLM(GlmConfig.from_pretrained(bundled.path("glm"), num_hidden_layers=args.layers))
    else:
        model = GlmForCausalLM.from_pretrained(args.init)
    tokens = torch.tensor(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"])
    held_out = tokens[:500]  # the bench's passage: the text's beginning
    text = tokens if args.init is not None else None
    vocab = tokenizer.vocab_size - 16  # plain ids, no special tokens
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 50 if args.init is None else 10
    budget, start, step = args.minutes * 60, time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimizer.param_groups:  # warmup, then cosine to 10 % over the time budget
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * elapsed / budget))
        model.train()
        batch = copy_batch(args.batch, (args.min_len, args.max_len), vocab, text, gen)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 200 == 0:
            model.eval()
            share = copy_share(model, tokenizer, held_out)
            print(f"step {step} ({elapsed / 60:.1f} min): loss {loss.item():.3f}, greedy repeats the held-out passage "
                  f"for {share:.0%} of its text", flush=True)  # fmt: skip
    model.eval()
    share = copy_share(model, tokenizer, held_out, new=128)
    print(f"after {step} steps: greedy repeats the held-out passage for {share:.0%} of 128 new tokens' text")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
