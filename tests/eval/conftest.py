"""A tiny random reference checkpoint per family, saved with the bundled model's tokenizer (vocabulary 2048)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_DECODERS, scale_weights

MAX_POSITIONS = 64  # small, so that long inputs and rolling windows are cheap to reach
SPECIAL_IDS = {  # the bundled tokenizers' ids
    "glm": dict(pad_token_id=2038, eos_token_id=2038),
    "xglm": dict(pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "persimmon": dict(pad_token_id=None, bos_token_id=1, eos_token_id=2),
}


def build_checkpoint(family: str, directory: Path):
    """Save a random transformers model of `family` (weights scaled up) with the bundled tokenizer; return it."""
    import transformers

    config_name, model_name, _, kwargs = TINY_DECODERS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=2048, max_position_embeddings=MAX_POSITIONS,
                                                **{**kwargs, **SPECIAL_IDS[family]})  # fmt: skip
    ref = getattr(transformers, model_name)(config).eval()
    scale_weights(ref, factor=4.0)
    ref.save_pretrained(directory)
    for file in (REPO / "glmkit" / "bundled" / family).iterdir():
        if "token" in file.name or file.suffix in (".model", ".jinja"):
            shutil.copyfile(file, directory / file.name)
    return ref


@pytest.fixture(scope="module", params=["glm", "xglm", "persimmon"])
def checkpoint(request, tmp_path_factory) -> tuple[str, Path, object]:
    """(family, directory, reference model)."""
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, build_checkpoint(request.param, directory)
