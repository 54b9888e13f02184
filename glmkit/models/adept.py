"""Persimmon from Adept's original release (`8b_base_model_release.tar` / `8b_chat_model_release.tar`).

The release holds `adept_vocab.model` and, under an iteration folder, `mp_rank_00/model_optim_rng.pt`: a
Megatron training checkpoint with the weights under ["model"] (nested dicts, names such as
`language_model.encoder.layers.N.self_attention.query_key_value.weight`), the training arguments under
["args"] and optimizer / RNG state. It is read with `safe_pickle.load_inert` (Adept's classes become inert
records; a pickle that would call a function is refused), so no Adept code is needed or run.

The weights need renaming only: Adept's fused query_key_value is already laid out per head (H, 3, D), as the
Hugging Face layout keeps it. The config comes from the tensors' shapes, then the stored arguments, then
the 8B defaults (PersimmonConfig's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, TensorDictReader
from ..safe_pickle import InertObject, load_inert

CHECKPOINT_NAME = "model_optim_rng.pt"
VOCAB_NAME = "adept_vocab.model"
BOS_TOKEN = "|ENDOFTEXT|"
# Adept name prefix -> Hugging Face name prefix (the first that matches)
ADEPT_PREFIXES = (
    ("language_model.encoder.", "model."),
    ("language_model.embedding.word_embeddings.", "model.embed_tokens."),
    ("word_embeddings_for_head.", "lm_head."),
)
DROPPED = re.compile(r".*rotary_emb\.inv_freq$")  # derived buffers, never loaded
# Adept's training argument -> PersimmonConfig field (what the tensors' shapes do not say)
ARGUMENT_FIELDS = {
    "max_position_embeddings": "max_position_embeddings",
    "rotary_pct": "partial_rotary_factor",
    "rotary_emb_base": "rope_theta",
    "layernorm_epsilon": "layer_norm_eps",
}


def find_release_checkpoint(directory: Path) -> Path | None:
    """The release's model_optim_rng.pt (the latest iteration's mp_rank_00), or None when there is none."""
    found = sorted(directory.rglob(CHECKPOINT_NAME))
    if not found:
        return None
    sharded = [f for f in found if f.parent.name.startswith("mp_rank_") and f.parent.name != "mp_rank_00"]
    if sharded:
        raise CheckpointError(f"{directory} is a tensor-parallel release ({sharded[0].parent.name}); only "
                              "single-shard (mp_rank_00) releases can be read")  # fmt: skip
    latest = directory / "latest_checkpointed_iteration.txt"
    if latest.is_file() and latest.read_text().strip().isdigit():
        wanted = f"iter_{int(latest.read_text()):07d}"
        found = [f for f in found if wanted in f.parts] or found
    return max(found, key=lambda f: [int(n) for n in re.findall(r"\d+", str(f.relative_to(directory)))])


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def adept_to_hf(weights: dict) -> dict[str, torch.Tensor]:
    """Adept's ["model"] tree -> Hugging Face Persimmon names (the one re-layout: names only)."""
    out = {}
    for name, tensor in _flatten(weights).items():
        if DROPPED.fullmatch(name) or not isinstance(tensor, torch.Tensor):
            continue
        for old, new in ADEPT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name.replace(".self_attention.", ".self_attn.")] = tensor
    return out


def release_config(weights: dict[str, torch.Tensor], arguments: dict[str, Any]) -> dict[str, Any]:
    """config.json fields of a release: sizes from the tensors, the rest from the training arguments."""
    try:
        vocab_size, hidden_size = weights["model.embed_tokens.weight"].shape
        intermediate_size = weights["model.layers.0.mlp.dense_h_to_4h.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a Persimmon release: no {err.args[0]} among its weights") from None
    layers = {int(m[1]) for name in weights if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    q_norm = weights.get("model.layers.0.self_attn.q_layernorm.weight")
    heads = hidden_size // q_norm.shape[0] if q_norm is not None else arguments.get("num_attention_heads", 64)
    config = {"model_type": "persimmon", "architectures": ["PersimmonForCausalLM"], "vocab_size": vocab_size,
              "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": len(layers),
              "num_attention_heads": heads, "qk_layernorm": q_norm is not None,
              "tie_word_embeddings": "lm_head.weight" not in weights}  # fmt: skip
    config.update({field: arguments[arg] for arg, field in ARGUMENT_FIELDS.items() if arguments.get(arg) is not None})
    return config


@dataclass
class AdeptRelease:
    directory: Path
    config: dict[str, Any]
    reader: TensorDictReader  # the HF-named tensors, each read copied out of the file's mapping

    @property
    def vocab_file(self) -> Path | None:
        found = sorted(self.directory.rglob(VOCAB_NAME))
        return found[0] if found else None


def open_release(directory: str | Path) -> AdeptRelease | None:
    """Adept's release in `directory` (weights read lazily through a memory map), or None if it is not one."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return None
    checkpoint = find_release_checkpoint(directory)
    if checkpoint is None:
        return None
    state = load_inert(checkpoint)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CheckpointError(f"{checkpoint} holds no ['model'] weights: not an Adept release checkpoint")
    weights = adept_to_hf(state["model"])
    config = release_config(weights, _fields(state.get("args")))
    return AdeptRelease(directory, config, TensorDictReader(weights, checkpoint.parent, [checkpoint], copy=True))


def _fields(arguments: Any) -> dict[str, Any]:
    """The stored training arguments as a dict (an inert argparse.Namespace, a dict, or nothing)."""
    if isinstance(arguments, InertObject):
        return arguments.fields()
    return dict(arguments) if isinstance(arguments, dict) else {}
