"""Hub ids resolve through a huggingface_hub cache laid out exactly as huggingface_hub writes it; no test here
may reach the network (sockets are blocked)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glmkit
from glmkit import GlmConfig, GlmForCausalLM
from glmkit.cli import main
from glmkit.hub import NotInCacheError, resolve_checkpoint_dir, select_hub_files

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, pad_token_id=0,
)  # fmt: skip
COMMIT_A, COMMIT_B = "a" * 40, "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def add_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, refs: tuple[str, ...]) -> None:
    """models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def tiny_checkpoint(path: Path, seed: int) -> dict[str, bytes]:
    torch.manual_seed(seed)
    GlmForCausalLM(GlmConfig(**TINY)).save_pretrained(path)
    return {f.name: f.read_bytes() for f in path.iterdir()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A cache holding org/tiny at two commits (main -> A; tag v2 -> B), plus the plain directories."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    files_a, files_b = tiny_checkpoint(root / "a", 0), tiny_checkpoint(root / "b", 1)
    add_snapshot(cache, "org/tiny", files_a, COMMIT_A, ("main",))
    add_snapshot(cache, "org/tiny", files_b, COMMIT_B, ("v2",))
    return cache, root / "a", root / "b"


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(1, 9)[None]).logits


def test_hub_id_offline_from_hf_hub_cache(hub, monkeypatch):
    cache, dir_a, dir_b = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    want_a, want_b = logits(GlmForCausalLM.from_pretrained(dir_a)), logits(GlmForCausalLM.from_pretrained(dir_b))
    assert not torch.equal(want_a, want_b)
    assert resolve_checkpoint_dir("org/tiny") == cache / "models--org--tiny" / "snapshots" / COMMIT_A
    assert torch.equal(logits(GlmForCausalLM.from_pretrained("org/tiny")), want_a)
    assert torch.equal(logits(glmkit.AutoModelForCausalLM.from_pretrained("org/tiny", revision=COMMIT_B)), want_b)
    assert torch.equal(logits(GlmForCausalLM.from_pretrained("org/tiny", revision="v2")), want_b)
    config = glmkit.AutoConfig.from_pretrained("org/tiny", revision="v2", num_labels=3)
    assert type(config) is GlmConfig and config.num_labels == 3 and not hasattr(config, "revision")


def test_local_files_only_with_cache_dir(hub):
    cache, dir_a, _ = hub
    model = GlmForCausalLM.from_pretrained("org/tiny", cache_dir=cache, local_files_only=True)
    assert torch.equal(logits(model), logits(GlmForCausalLM.from_pretrained(dir_a)))


@pytest.mark.parametrize("repo_id,revision", [("org/missing", None), ("org/tiny", "no-such-branch")])
def test_offline_and_not_cached_is_a_clear_error(hub, monkeypatch, repo_id, revision):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotInCacheError) as err:
        GlmForCausalLM.from_pretrained(repo_id, revision=revision, cache_dir=hub[0])
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert repo_id in message and "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message


def test_missing_local_directory_is_not_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "nothing" / "here")


def test_select_hub_files_takes_one_weight_layout_and_no_code():
    listing = [
        "config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json", "README.md",
        "modeling_chatglm.py", "tokenization_chatglm.py", "model.safetensors.index.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "pytorch_model.bin.index.json",
        "pytorch_model-00001-of-00002.bin", "original/consolidated.safetensors", "chat_template.jinja",
    ]  # fmt: skip
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    wanted = select_hub_files(listing, lambda name: index)
    assert sorted(wanted) == sorted(
        ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
         "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    )  # fmt: skip
    bin_only = ["config.json", "pytorch_model.bin", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "x.py"]
    assert set(select_hub_files(bin_only, lambda name: {})) == set(bin_only) - {"x.py"}


def test_cli_info_on_a_hub_id(hub, capsys):
    cache = hub[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run(
        [sys.executable, "-m", "glmkit.cli", "info", "org/tiny", "--revision", "v2", "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["family"] == "glm" and facts["path"].endswith(COMMIT_B)
    assert facts["weight_files"].keys() == {"model.safetensors"} and facts["chat_template"] is False
    # an uncached id: one line on stderr, exit status 1
    assert main(["info", "org/missing", "--local-files-only", "--cache-dir", str(cache)]) == 1
    assert "'org/missing' is not in the local Hugging Face cache" in capsys.readouterr().err


def test_online_path_downloads_only_what_it_selects(hub, monkeypatch):
    """The Hub's answers are stubbed: what matters is that snapshot_download is asked for the selection."""
    import huggingface_hub

    cache, dir_a, _ = hub
    listing = ["config.json", "model.safetensors", "pytorch_model.bin", "modeling.py", "tokenizer.json"]
    calls = {}

    def snapshot_download(repo_id, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        return str(dir_a)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_checkpoint_dir("org/tiny", revision="v2", cache_dir=cache, token="t") == dir_a
    assert calls == {
        "repo_id": "org/tiny", "revision": "v2", "cache_dir": str(cache), "token": "t",
        "allow_patterns": ["config.json", "tokenizer.json", "model.safetensors"],
    }  # fmt: skip
