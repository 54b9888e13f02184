"""Where a model's config and weights come from: a Hugging Face directory (or hub id), Adept's original
Persimmon release, or a llama.cpp GGUF file. `from_pretrained` and the Auto classes open a source once and
read the config dict and the weights through it, whatever the format."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, TensorDictReader, WeightReader
from .config import read_config_dict
from .hub import resolve_checkpoint_dir
from .models.adept import AdeptRelease, open_release
from .quant.gguf import GGUFCheckpoint, gguf_file_path, is_gguf_path


@dataclass
class CheckpointSource:
    """An opened checkpoint: `config` is its config dict (with model_type); `kind` is "hf", "adept", "gguf" or
    "state_dict" (weights given in memory, no files)."""

    directory: Path | None
    config: dict[str, Any]
    kind: str = "hf"
    release: AdeptRelease | None = None
    gguf: GGUFCheckpoint | None = None
    state_dict: dict[str, Any] | None = None  # the caller's weights, read instead of the files

    def reader(self, model_class: Any, config: Any) -> Any:
        """The weights under the model's HF names (a family's own re-layout applied to HF directories)."""
        if self.state_dict is not None:
            raw = TensorDictReader(self.state_dict, "state_dict")
        elif self.gguf is not None:
            return self.gguf.weights(config)
        else:
            raw = self.release.reader if self.release is not None else WeightReader(self.directory)
        return model_class.adapt_checkpoint(raw, config)

    def has_generation_config(self) -> bool:
        """A generation_config.json of this checkpoint (a GGUF file's folder may hold another model's)."""
        from .generation.config import GENERATION_CONFIG_NAME  # the generation package imports the models

        return self.kind in ("hf", "adept") and (self.directory / GENERATION_CONFIG_NAME).is_file()

    def check_family(self, model_type: str, class_name: str) -> None:
        """A foreign format names its family itself: loading it into another family's class is an error."""
        if self.kind in ("adept", "gguf") and self.config.get("model_type") != model_type:
            raise CheckpointError(f"{self.gguf.path if self.gguf else self.directory} is a "
                                  f"{self.config.get('model_type')} checkpoint ({self.kind}): {class_name} "
                                  "cannot load it")  # fmt: skip


def open_source(name_or_path: str | os.PathLike | CheckpointSource | None,
                gguf_file: str | os.PathLike | None = None, state_dict: dict[str, Any] | None = None,
                **hub_kwargs: Any) -> CheckpointSource:  # fmt: skip
    """Open `name_or_path` (an already opened source is returned as it is, so the Auto classes open once).
    `state_dict` replaces the files' weights; with no path it is the whole source (the config comes from the
    caller)."""
    if isinstance(name_or_path, CheckpointSource):
        source = name_or_path
    elif name_or_path is None:
        source = CheckpointSource(None, {}, "state_dict")
    elif gguf_file is not None or is_gguf_path(name_or_path):
        gguf = GGUFCheckpoint(gguf_file_path(name_or_path, gguf_file, **hub_kwargs))
        source = CheckpointSource(gguf.path.parent, gguf.config_dict(), "gguf", gguf=gguf)
    else:
        directory = resolve_checkpoint_dir(name_or_path, **hub_kwargs)
        release = open_release(directory)  # Adept's release has no config.json; read without running its code
        source = (CheckpointSource(directory, release.config, "adept", release=release) if release is not None
                  else CheckpointSource(directory, read_config_dict(directory)))  # fmt: skip
    if state_dict is not None:
        if source.kind in ("adept", "gguf"):
            raise ValueError(f"state_dict= replaces the weights of a Hugging Face checkpoint, not of {source.kind}'s "
                             "format: load the file alone")  # fmt: skip
        source.state_dict = state_dict
    return source
