"""Adept's original Persimmon release: converted without running its pickled code.

A random reference Persimmon is written in Adept's layout (model_optim_rng.pt under iteration / mp_rank_00
folders, nested Megatron names, training arguments pickled as an instance of a class whose module no longer
exists, optimizer and RNG state) with a sentencepiece adept_vocab.model; glmkit converts and loads it.
"""

from __future__ import annotations

import enum
import json
import os
import random
import sys
import types

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from conftest import assert_close, scale_weights
from safetensors import safe_open

from glmkit import AutoConfig, AutoModelForCausalLM
from glmkit.checkpoint import CheckpointError
from glmkit.cli import main
from glmkit.models.persimmon import PersimmonForCausalLM
from glmkit.safe_pickle import UnsafePickleError, load_inert
from glmkit.tokenization import AutoTokenizer

GONE = "adept_megatron_gone"  # the module Adept's classes were pickled from: not importable when loading
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            partial_rotary_factor=0.25, max_position_embeddings=64, layer_norm_eps=1e-6)  # fmt: skip
TEXTS = ["human: hello there\n\nadept:", "The quick brown fox, 12345 times.", "|ENDOFTEXT| a b c"]


class Arguments:
    """Stands for Adept's pickled training arguments (an argparse.Namespace-like object of its own class)."""


class Precision(enum.Enum):
    BF16 = "bf16"


def adept_tree(state: dict[str, torch.Tensor]) -> dict:
    """A Hugging Face Persimmon state dict in Adept's nested Megatron layout (written out by hand here)."""
    encoder = {}
    for name, tensor in state.items():
        if name.startswith("model.layers.") or name.startswith("model.final_layernorm."):
            encoder[name.removeprefix("model.").replace(".self_attn.", ".self_attention.")] = tensor
    encoder["layers.0.self_attention.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer the release carries
    return {
        "language_model": {"embedding": {"word_embeddings": {"weight": state["model.embed_tokens.weight"]}},
                           "encoder": encoder},
        "word_embeddings_for_head": {"weight": state["lm_head.weight"]},
    }  # fmt: skip


def save_with_gone_classes(obj: object, path) -> None:
    """torch.save with Arguments / Precision pickled as members of GONE, which is then removed again."""
    module = types.ModuleType(GONE)
    for cls in (Arguments, Precision):
        cls.__module__, cls.__qualname__ = GONE, cls.__name__
        setattr(module, cls.__name__, cls)
    sys.modules[GONE] = module
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
    finally:
        del sys.modules[GONE]
        for cls in (Arguments, Precision):
            cls.__module__ = __name__


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release directory, reference model, sentencepiece model path)."""
    root = tmp_path_factory.mktemp("adept")
    torch.manual_seed(0)
    ref = transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**TINY)).eval()
    scale_weights(ref, factor=4.0)
    args = Arguments()
    args.__dict__.update(rotary_pct=0.25, rotary_emb_base=25000, layernorm_epsilon=1e-6, max_position_embeddings=64,
                         num_layers=2, params_dtype=torch.bfloat16, precision=Precision.BF16)  # fmt: skip
    np.random.seed(0)
    checkpoint = {
        "model": adept_tree(ref.state_dict()),
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 7,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
        "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                       "torch_rng_state": torch.get_rng_state()}],
    }  # fmt: skip
    save_with_gone_classes(checkpoint, root / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt")
    save_with_gone_classes({"model": {}}, root / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt")  # older
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    words = "the quick brown fox jumps over lazy dog hello there human adept times a b c".split()
    rng = random.Random(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(" ".join(rng.choices(words, k=12)) + " 12345" for _ in range(300)),
        model_prefix=str(root / "adept_vocab"), model_type="unigram", vocab_size=300, byte_fallback=True,
        hard_vocab_limit=False,
        user_defined_symbols=["|ENDOFTEXT|"], minloglevel=2,
    )  # fmt: skip
    return root, ref, root / "adept_vocab.model"


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def test_pickled_classes_become_inert(release):
    root, _, _ = release
    assert GONE not in sys.modules
    state = load_inert(root / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt")
    args = state["args"]
    assert type(args).__name__ == "Arguments" and args.fields()["rotary_pct"] == 0.25
    assert args.fields()["params_dtype"] is torch.bfloat16
    assert repr(args.fields()["precision"]) == f"<inert {GONE}.Precision>"
    assert isinstance(state["rng_state"][0]["torch_rng_state"], torch.Tensor)


def test_convert_matches_the_source_model(release, tmp_path):
    root, ref, vocab = release
    out = tmp_path / "hf"
    assert main(["convert", "--from", "adept", str(root), str(out), "--dtype", "float32"]) == 0
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    want = logits(ref, ids)
    assert_close(logits(PersimmonForCausalLM.from_pretrained(out), ids), want, 1e-5, "converted")
    assert_close(logits(transformers.PersimmonForCausalLM.from_pretrained(out), ids), want, 1e-5, "reference load")
    config = json.loads((out / "config.json").read_text())
    assert config["partial_rotary_factor"] == 0.25 and config["layer_norm_eps"] == 1e-6  # from the stored args
    theirs = transformers.LlamaTokenizer(str(vocab), bos_token="|ENDOFTEXT|", eos_token=None)
    ours = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    assert ours.bos_token == "|ENDOFTEXT|" and ours.eos_token is None


def test_default_conversion_is_bfloat16(release, tmp_path):
    root, ref, _ = release
    out = tmp_path / "bf16"
    assert main(["convert", str(root), str(out)]) == 0  # the layout is detected
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_from_pretrained_reads_the_release(release):
    root, ref, _ = release
    ids = torch.randint(0, TINY["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    for cls in (PersimmonForCausalLM, AutoModelForCausalLM):
        assert_close(logits(cls.from_pretrained(root, dtype=torch.float32), ids), logits(ref, ids), 1e-5, cls.__name__)
    config = AutoConfig.from_pretrained(root)
    assert (config.model_type, config.hidden_size, config.num_attention_heads) == ("persimmon", 64, 4)


def _mark(path: str) -> None:  # what a malicious pickle would run
    with open(path, "w") as f:
        f.write("ran")


class Malicious:
    def __init__(self, call):
        self.call = call

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("how", ["function", "os.system"])
def test_a_pickle_that_calls_a_function_is_refused(tmp_path, how):
    marker = tmp_path / "ran"
    call = (_mark, (str(marker),)) if how == "function" else (os.system, (f"touch {marker}",))
    root = tmp_path / "release"
    path = root / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": {"language_model": {}}, "args": Malicious(call)}, path)
    with pytest.raises(UnsafePickleError, match="refused, nothing was executed"):
        PersimmonForCausalLM.from_pretrained(root)
    assert main(["convert", "--from", "adept", str(root), str(tmp_path / "out")]) == 1
    assert not marker.exists()


def test_not_a_release_is_a_clear_error(tmp_path):
    assert main(["convert", "--from", "adept", str(tmp_path), str(tmp_path / "out")]) == 1


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        PersimmonForCausalLM.from_pretrained(tmp_path)
