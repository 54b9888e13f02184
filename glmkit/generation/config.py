"""GenerationConfig: decoding settings, read from generation_config.json and overridable by keyword."""

from __future__ import annotations

import copy
import json
import numbers
import os
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text
from .constraints import build_constraints

GENERATION_CONFIG_NAME = "generation_config.json"

DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "do_sample": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "force_words_ids": None,
    "constraints": None,
    "penalty_alpha": None,
    "dola_layers": None,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": False,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "renormalize_logits": False,
    "encoder_no_repeat_ngram_size": 0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "num_return_sequences": 1,
    "stop_strings": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "bos_token_id": None,
    "output_scores": False,
    "output_logits": None,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
    "use_cache": True,
    # speculative decoding
    "prompt_lookup_num_tokens": None,
    "max_matching_ngram_size": None,
    "num_assistant_tokens": 20,
    "assistant_confidence_threshold": 0.4,
    "num_assistant_tokens_schedule": "constant",
}


# integer settings and their smallest sensible value (no_repeat_ngram_size <= 0 is ignored, as in the reference)
_INT_MINIMUM = {
    "max_length": 1, "max_new_tokens": 1, "min_length": 0, "min_new_tokens": 0, "num_beams": 1,
    "num_beam_groups": 1, "num_return_sequences": 1, "top_k": 0, "no_repeat_ngram_size": -(2**63),
    "prompt_lookup_num_tokens": 1, "max_matching_ngram_size": 1, "num_assistant_tokens": 1,
}  # fmt: skip
_FLOATS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "length_penalty",
           "assistant_confidence_threshold", "diversity_penalty", "penalty_alpha")  # fmt: skip
_BOOLS = ("do_sample", "output_scores", "output_attentions", "output_hidden_states", "return_dict_in_generate",
          "use_cache")  # fmt: skip


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class GenerationConfig:
    """Decoding settings with the reference's defaults (note top_k=50 applies whenever do_sample).

    Unknown keys are kept and written back. `validate()` raises on combinations that cannot work.
    """

    def __init__(self, **kwargs: Any):
        for key, value in {**copy.deepcopy(DEFAULTS), **kwargs}.items():
            setattr(self, key, value)

    def update(self, **kwargs: Any) -> GenerationConfig:
        """A copy with the given (non-None-meaning) overrides applied."""
        new = copy.deepcopy(self)
        for key, value in kwargs.items():
            setattr(new, key, value)
        return new

    def validate(self) -> None:
        """Raise TypeError for a wrong-typed setting and ValueError for an impossible one, naming it."""
        self._check_types()
        if self.do_sample:
            t = self.temperature
            if t is not None and (not isinstance(t, (int, float)) or t <= 0):
                raise ValueError(
                    f"`temperature` (={t}) has to be a strictly positive float, otherwise your next token scores "
                    "will be invalid. If you're looking for greedy decoding strategies, set `do_sample=False`."
                )
            if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
                raise ValueError(f"`top_p` has to be a float in [0, 1], got {self.top_p}")
            if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
                raise ValueError(f"`min_p` has to be a float in [0, 1], got {self.min_p}")
            if self.typical_p is not None and not 0.0 < self.typical_p <= 1.0:
                raise ValueError(f"`typical_p` has to be a float in (0, 1], got {self.typical_p}")
            if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
                raise ValueError(f"`top_k` has to be a non-negative integer, got {self.top_k}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"`repetition_penalty` has to be a strictly positive float, got {self.repetition_penalty}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"`num_beams` must be a positive integer, got {self.num_beams}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or equal to "
                f"`num_beams` ({self.num_beams})."
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"`early_stopping` must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams == 1 and self.num_return_sequences > 1 and not self.do_sample:
            raise ValueError(
                "Greedy methods without beam search do not support `num_return_sequences` different than 1 "
                f"(got {self.num_return_sequences})."
            )
        for name, low in _INT_MINIMUM.items():
            value = getattr(self, name, None)
            if value is not None and value < low:
                raise ValueError(f"`{name}` must be >= {low}, but is {value}.")
        self._check_beam_variants()
        self._check_contrastive_and_dola()
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            ids = getattr(self, name, None)
            if any(i < 0 for i in ([ids] if isinstance(ids, int) else ids or [])):
                raise ValueError(f"`{name}` must be non-negative token ids, got {ids!r}")

    def _check_beam_variants(self) -> None:
        """Group (diverse) and constrained beam search: the reference's rules, and well-formed constraints."""
        groups, diversity = self.num_beam_groups, self.diversity_penalty
        constrained = self.constraints is not None or self.force_words_ids is not None
        if diversity is not None and diversity < 0:
            raise ValueError(f"`diversity_penalty` must be >= 0, got {diversity}")
        if constrained:
            build_constraints(self.force_words_ids, self.constraints)
            mode = "one of `constraints`, `force_words_ids` is set (constrained beam search), which needs "
            if self.num_beams < 2:
                raise ValueError(mode + f"`num_beams` > 1, got {self.num_beams}")
            if self.do_sample:
                raise ValueError(mode + "`do_sample=False`")
            if groups != 1:
                raise ValueError(mode + f"`num_beam_groups` = 1, got {groups}")
        elif self.num_beams > 1 and (diversity or groups != 1):
            mode = (
                "`diversity_penalty` is not 0.0 or `num_beam_groups` is not 1 (group beam search): "
                f"num_beams={self.num_beams}, num_beam_groups={groups}, diversity_penalty={diversity}; "
            )
            if self.do_sample:
                raise ValueError(mode + "`do_sample` must be set to `False`")
            if self.num_beams % groups:
                raise ValueError(mode + "`num_beams` should be divisible by `num_beam_groups`")
            if not diversity:
                raise ValueError(mode + "`diversity_penalty` should be greater than `0.0`, otherwise your groups "
                                 "will be identical")  # fmt: skip
            if groups < 2:
                raise ValueError(mode + "`num_beam_groups` should be an integer strictly larger than 1")
        elif diversity:
            raise ValueError(f"`diversity_penalty` ({diversity}) needs group beam search: num_beams > 1 and "
                             "num_beam_groups > 1")  # fmt: skip

    def _check_contrastive_and_dola(self) -> None:
        """Contrastive search (penalty_alpha > 0) and DoLa (dola_layers) are greedy / sampling modes of their own:
        where the reference silently falls back to another mode (or ignores the setting), refuse instead."""
        alpha, layers = self.penalty_alpha, self.dola_layers
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`penalty_alpha` (the degeneration penalty's weight) must be in [0, 1], got {alpha}")
        if alpha:
            mode = f"`penalty_alpha` = {alpha} asks for contrastive search, which needs "
            if self.top_k is None or self.top_k < 2:
                raise ValueError(mode + f"`top_k` > 1 candidates per step, got top_k={self.top_k}")
            if self.do_sample:
                raise ValueError(mode + "`do_sample=False` (it is a greedy method)")
            if self.num_beams != 1:
                raise ValueError(mode + f"`num_beams` = 1, got {self.num_beams}")
            if layers is not None:
                raise ValueError(mode + "no `dola_layers` (DoLa is another decoding method)")
        if layers is None:
            return
        if isinstance(layers, str):
            if layers not in ("low", "high"):
                raise ValueError(f"`dola_layers` must be 'low', 'high' or a list of layer indices, got {layers!r}")
        elif not (isinstance(layers, (list, tuple)) and layers and all(_is_int(i) and i >= 0 for i in layers)):
            raise ValueError(f"`dola_layers` must be 'low', 'high' or a non-empty list of layer indices >= 0 (0 is "
                             f"the embeddings), got {layers!r}")  # fmt: skip
        if self.num_beams != 1:
            raise ValueError(f"`dola_layers` ({layers!r}) asks for DoLa decoding, which is greedy or sampling: it "
                             f"needs `num_beams` = 1, got {self.num_beams}")  # fmt: skip

    def _check_types(self) -> None:
        for name in _INT_MINIMUM:
            value = getattr(self, name, None)
            if value is not None and not _is_int(value):
                raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__})")
        for name in _FLOATS:
            value = getattr(self, name, None)
            if value is not None and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
                raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__})")
        for name in _BOOLS:
            value = getattr(self, name, None)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__})")
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            ids = getattr(self, name, None)
            if ids is not None and not (_is_int(ids) or (isinstance(ids, (list, tuple)) and all(map(_is_int, ids)))):
                raise TypeError(f"`{name}` must be a token id or a list of them, got {ids!r}")
        if self.stop_strings is not None and not isinstance(self.stop_strings, (str, list, tuple)):
            raise TypeError(f"`stop_strings` must be a string or a list of strings, got {self.stop_strings!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the values that differ from the defaults (what generation_config.json holds)."""
        return {k: v for k, v in self.to_dict().items() if k not in DEFAULTS or DEFAULTS[k] != v}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / GENERATION_CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_diff_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GenerationConfig:
        path = Path(directory) / GENERATION_CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        data.pop("transformers_version", None)
        data.pop("_from_model_config", None)
        return cls(**data)

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        return cls(**{k: getattr(config, k, None) for k in ("eos_token_id", "pad_token_id", "bos_token_id")})

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self.to_diff_dict(), sort_keys=True)}"
