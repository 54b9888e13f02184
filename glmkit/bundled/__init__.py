"""Small default checkpoints shipped inside the package, one per family, trained on Tiny Shakespeare.

    from glmkit import AutoModelForCausalLM, AutoTokenizer, bundled
    model = AutoModelForCausalLM.from_pretrained(bundled.path("glm"))
    tokenizer = AutoTokenizer.from_pretrained(bundled.path("glm"))

They exist so that `glmkit generate` and the examples work offline; see README.md in this folder for
their sizes, losses and how to retrain them (scripts/train_bundled.py).
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("glm", "xglm", "persimmon")


def path(family: str = "glm") -> Path:
    """The directory of the bundled checkpoint of `family` (Hugging Face layout: config, weights, tokenizer)."""
    if family not in FAMILIES:
        raise ValueError(f"no bundled model for family {family!r}: choose one of {', '.join(FAMILIES)}")
    directory = Path(__file__).resolve().parent / family
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the bundled {family} model is missing from {directory} (an install without package data?); "
            "rebuild it with `python scripts/train_bundled.py`"
        )
    return directory
