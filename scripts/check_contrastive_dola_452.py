"""Contrastive search and DoLa: glmkit against transformers 4.52.4 itself, on the same random weights.

transformers 4.52.4 is the last release that runs both in its core (later ones fetch them from the Hub as
remote code), so it cannot be the test suite's oracle (4.56.2); this script is run by hand instead, in a
scratch environment (its results are quoted in handoff/contrastive-dola.md):

    python3 -m venv /tmp/tf452 && /tmp/tf452/bin/pip install -q torch==2.13.0
    /tmp/tf452/bin/pip install -q transformers==4.52.4 safetensors
    /tmp/tf452/bin/pip install -q -e . --no-deps
    /tmp/tf452/bin/python scripts/check_contrastive_dola_452.py

For tiny 6-layer models of each family (weights drawn larger than the init, so that any slip shows), a
batch of three prompts (two left-padded), it prints per setting whether the tokens are identical and the
largest difference of the returned scores (processed logits; -inf entries must coincide), and whether the
setting's tokens differ from plain greedy decoding / sampling (else the comparison would prove little).
"""

from __future__ import annotations

import importlib
import math
import sys
import tempfile
from pathlib import Path

import torch
import transformers

transformers.logging.set_verbosity_error()  # DoLa without repetition_penalty >= 1.2 draws a recommendation

VOCAB, P, NEW, PAD = 96, 7, 16, 0
FAMILIES = {
    "glm": ("GlmConfig", "GlmForCausalLM", "glmkit.models.glm", dict(
        hidden_size=64, intermediate_size=80, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, pad_token_id=PAD, eos_token_id=1,
    )),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", "glmkit.models.xglm", dict(
        d_model=48, ffn_dim=80, num_layers=6, attention_heads=4, pad_token_id=PAD, bos_token_id=2, eos_token_id=1,
        dropout=0.0, attention_dropout=0.0,
    )),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", "glmkit.models.persimmon", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4, pad_token_id=PAD,
        eos_token_id=1, bos_token_id=2,
    )),
}  # fmt: skip
SETTINGS = [
    ("contrastive k=4 a=0.6", dict(penalty_alpha=0.6, top_k=4)),
    ("contrastive k=6 a=0.4 rep=1.2", dict(penalty_alpha=0.4, top_k=6, repetition_penalty=1.2)),
    ("contrastive k=4 a=0.6 +eos", dict(penalty_alpha=0.6, top_k=4, eos="early")),
    ("dola low rep=1.2", dict(dola_layers="low", repetition_penalty=1.2)),
    ("dola high rep=1.2", dict(dola_layers="high", repetition_penalty=1.2)),
    ("dola [0,2,4] rep=1.2 +eos", dict(dola_layers=[0, 2, 4], repetition_penalty=1.2, eos="early")),
    ("dola high sampled", dict(dola_layers="high", do_sample=True, temperature=0.8, seed=7)),
    ("dola [1,3,5] sampled top_p", dict(dola_layers=[1, 3, 5], do_sample=True, top_p=0.9, seed=8)),
]


def tiny_pair(family: str, directory: Path):
    """A random reference model (weights std 0.12, biases 0.1, norms 1 +- 0.2) and glmkit's, loaded from its save."""
    config_name, model_name, module_name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    ref = getattr(transformers, model_name)(getattr(transformers, config_name)(vocab_size=VOCAB, **kwargs)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.dim() == 1:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.12)
    ref.save_pretrained(directory)
    ours = getattr(importlib.import_module(module_name), model_name).from_pretrained(directory)
    return ref, ours


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, P), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = PAD, 0
    ids[2, :1], mask[2, :1] = PAD, 0
    return ids, mask


def run(model, ids, mask, options: dict, eos: list[int] | None):
    options = dict(options)
    torch.manual_seed(options.pop("seed", 0))
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, output_scores=True,
                          return_dict_in_generate=True, **options)  # fmt: skip


def score_difference(ours, theirs) -> float:
    """Largest |difference| of the per-step scores, over the entries finite in both (inf: mismatched -inf)."""
    worst = 0.0
    for a, b in zip(ours.scores, theirs.scores):
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return math.inf
        finite = torch.isfinite(a)
        worst = max(worst, float((a[finite] - b[finite]).abs().max()))
    return worst


def main() -> int:
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    ids, mask = prompts()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            ref, ours = tiny_pair(family, Path(tmp) / family)
            for name, options in SETTINGS:
                options = dict(options)
                eos = None
                if options.pop("eos", None):  # a token row 0 produces mid-way, as its EOS (with the config's 1)
                    free = run(ref, ids, mask, options, None).sequences[0, P:].tolist()
                    at = next(i for i in range(2, NEW - 1) if free[i] not in free[:i])
                    eos = [free[at], 1]
                theirs, got = run(ref, ids, mask, options, eos), run(ours, ids, mask, options, eos)
                same = got.sequences.tolist() == theirs.sequences.tolist()
                failures += not same
                plain = {k: v for k, v in options.items() if k not in ("penalty_alpha", "top_k", "dola_layers")}
                moved = run(ref, ids, mask, plain, eos).sequences.tolist() != theirs.sequences.tolist()
                print(f"{family:10} {name:30} tokens {'identical' if same else 'DIFFER':9}  "
                      f"{got.sequences.shape[1] - P:2} new  max |score diff| {score_difference(got, theirs):.2e}  "
                      f"{'differs from' if moved else 'SAME AS'} plain decoding")
    print("all identical" if not failures else f"{failures} settings differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
