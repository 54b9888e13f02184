"""Where checkpoints come from: a local directory, or a hub id `org/name` resolved through the
Hugging Face cache (downloading only config, weights and tokenizer files — never code)."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger("glmkit")

HUB_KWARGS = ("revision", "local_files_only", "cache_dir", "token")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
CONFIG_FILES = ("config.json", "generation_config.json")
# tokenizer files of every layout glmkit reads (tokenizers, sentencepiece, GLM-4 tiktoken vocab)
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "*.model", "vocab.*", "*vocab*.txt", "*vocab*.json",
    "merges.txt", "*.tiktoken",
)  # fmt: skip
# weight layouts in the order the loader prefers them: (single file, sharded index)
WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
TRUTHY = {"1", "on", "yes", "true"}


class NotInCacheError(FileNotFoundError):
    """A hub id was asked for while downloading is off, and the local cache does not hold it."""


class HubUnreachableError(NotInCacheError):
    """A hub id was asked for online, the Hub could not be reached, and the local cache does not hold it."""


class HubError(FileNotFoundError):
    """A hub id that cannot be resolved: no such repository or revision, or no access to it."""


def pop_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the options that say where files come from (revision, token, …)."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUTHY


def resolve_checkpoint_dir(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    **_: object,
) -> Path:
    """Return the local directory holding a checkpoint: a bundled model for `default[:family]`,
    `name_or_path` itself when it is a directory, else the cached snapshot of hub id `org/name` at
    `revision` (downloaded unless offline).

    Raises FileNotFoundError (NotInCacheError when offline and not cached) naming what was asked for.
    """
    name = str(name_or_path)
    if name == "default" or name.startswith("default:"):  # the bundled Shakespeare models
        from .bundled import path as bundled_path

        return bundled_path(name.partition(":")[2] or "glm")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"checkpoint directory {name!r} does not exist (nor is it a hub id 'org/name')")
    return _snapshot(name, revision, local_files_only or hub_offline(), cache_dir, token)


def _snapshot(
    repo_id: str, revision: str | None, offline: bool, cache_dir: str | os.PathLike | None, token: Any
) -> Path:
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError as err:
        raise ImportError(f"loading hub id {repo_id!r} needs huggingface_hub: pip install huggingface_hub") from err
    cache_dir = str(cache_dir or os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    try:
        files = None if offline else _list_repo_files(hf, repo_id, revision, token, where)
        if files is None:
            return Path(hf.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))

        def read_index(name: str) -> dict:
            file = hf.hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, token=token)
            return json.loads(Path(file).read_text())

        wanted = select_hub_files(files, read_index)
        return Path(
            hf.snapshot_download(repo_id, revision=revision, allow_patterns=wanted, cache_dir=cache_dir, token=token)
        )
    except LocalEntryNotFoundError as err:
        if not offline:  # online, but the Hub did not answer (see _list_repo_files)
            raise HubUnreachableError(
                f"the Hugging Face Hub is unreachable (no network, a proxy or a firewall?) and {where} is not in "
                f"the local cache ({cache_dir}). Check the connection, or pass a local checkpoint directory "
                f"(there is no directory {repo_id!r} here)."
            ) from err
        raise NotInCacheError(
            f"{where} is not in the local Hugging Face cache ({cache_dir}) and downloading is off "
            f"(HF_HUB_OFFLINE=1 or local_files_only=True). Download it first while online (unset "
            f"HF_HUB_OFFLINE, or run `hf download {repo_id}`), or pass a local checkpoint directory "
            f"(there is no directory {repo_id!r} here)."
        ) from err
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:  # gated repos included
        raise HubError(f"no local directory {repo_id!r}, and {where} cannot be resolved on the Hub: {err}") from err


def _list_repo_files(hf: Any, repo_id: str, revision: str | None, token: Any, where: str) -> list[str] | None:
    """The repository's file list, or None when the Hub cannot be reached (then the cache is used)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return hf.HfApi().list_repo_files(repo_id, revision=revision, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except OSError as err:  # connection problems are OSErrors too
        logger.warning("cannot reach the Hugging Face Hub for %s (%s); using the local cache", where, err)
        return None


def select_hub_files(files: Iterable[str], read_index: Callable[[str], dict]) -> list[str]:
    """The repository files a checkpoint needs: configs, tokenizer files and exactly one weight layout
    (safetensors before .bin; the shards an index names). Top-level files only, never Python code."""
    top = [f for f in files if "/" not in f and not f.endswith((".py", ".pyc"))]
    wanted = [f for f in top if f in CONFIG_FILES or any(fnmatch.fnmatch(f, p) for p in TOKENIZER_PATTERNS)]
    for single, index in WEIGHT_LAYOUTS:
        if single in top:
            return [*wanted, single]
        if index in top:
            shards = sorted(set(read_index(index).get("weight_map", {}).values()))
            return [*wanted, index, *(s for s in shards if not s.endswith(".py"))]
    return wanted


def is_tokenizer_file(name: str) -> bool:
    """Whether a checkpoint file belongs to the tokenizer (what `glmkit convert` copies along)."""
    return not name.endswith(".py") and any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS)
