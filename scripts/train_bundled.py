"""Retrain the bundled default models (glmkit/bundled/{glm,xglm,persimmon}) on data/tinyshakespeare.txt.

    python scripts/train_bundled.py              # all three families, one after the other
    python scripts/train_bundled.py glm xglm     # some of them

Each run takes about 5 minutes on 2 CPU cores. The optimizer state (trainer_state.pt) is dropped: the
package ships weights, configs and tokenizer only. Prints the figures that glmkit/bundled/README.md quotes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from glmkit.train import FAMILIES, STATE_FILE, TrainOptions, train

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "tinyshakespeare.txt"
BUNDLED = REPO / "glmkit" / "bundled"
STEPS = {"glm": 550, "xglm": 700, "persimmon": 600}  # each about 4-5 minutes


def options(family: str) -> TrainOptions:
    """The exact settings the shipped checkpoints were trained with."""
    return TrainOptions(
        data=DATA,
        out=BUNDLED / family,
        family=family,
        preset="small",
        vocab_size=2048,
        block_size=128,
        batch_size=16,
        max_steps=STEPS[family],
        lr=3e-3,
        warmup_steps=20,
        eval_fraction=0.05,
        eval_every=100,
        eval_batches=100,  # the whole held-out tail
        log_every=10,
        seed=0,
    )


def main(families: list[str]) -> None:
    torch.set_num_threads(1)  # on 2 shared cores one thread beat two by 2-5x (no spin-waiting on a busy core)
    rows = []
    for family in families:
        opts = options(family)
        shutil.rmtree(opts.out, ignore_errors=True)
        r = train(opts)
        (Path(opts.out) / STATE_FILE).unlink()
        for f in Path(opts.out).iterdir():
            f.chmod(0o644)  # the weights are written through a private temp file (mode 600)
        rows.append(
            f"| {family} | {r.num_parameters:,} | {r.step} | {r.seconds / 60:.1f} min | "
            f"{r.eval_loss:.3f} | {r.unigram_eval_loss:.3f} |"
        )
    print("| family | parameters | steps | time | eval loss | unigram baseline |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    unknown = sorted(set(sys.argv[1:]) - set(FAMILIES))
    if unknown:
        sys.exit(f"unknown families {unknown}: choose from {', '.join(FAMILIES)}")
    main(sys.argv[1:] or list(FAMILIES))
