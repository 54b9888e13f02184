"""Nothing a user owns is lost: every writer leaves unrelated files alone, an interrupted save leaves the
old checkpoint loading, a loaded .bin owns its memory, and generation reserves only what can be used."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import glmkit.checkpoint as checkpoint_mod
import glmkit.config as config_mod
import glmkit.train as train_mod
from glmkit import AutoModelForCausalLM, AutoTokenizer, GlmConfig, GlmForCausalLM, bundled
from glmkit.cli import main as cli_main
from glmkit.generation.engine import reserved_length
from glmkit.train import TrainOptions

# files a user may keep beside a checkpoint; none of them is the save's to touch
BYSTANDERS = {
    "model_backup.safetensors": b"backup",
    "model-final-best.safetensors": b"best",
    "model-00001-of-00002.safetensors.bak": b"bak",
    "notes.txt": b"my notes",
    "vocab_notes.txt": b"mine too",
}


def _tiny(seed: int) -> GlmForCausalLM:
    torch.manual_seed(seed)
    config = GlmConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=[1])  # fmt: skip
    return GlmForCausalLM(config)


def _put_bystanders(directory):
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in BYSTANDERS.items():
        (directory / name).write_bytes(data)


def _assert_bystanders(directory):
    for name, data in BYSTANDERS.items():
        assert (directory / name).read_bytes() == data, f"{name} was changed or removed"


def _assert_same_weights(directory, model):
    loaded = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_save_pretrained_keeps_unrelated_files_and_replaces_only_its_own(tmp_path):
    _put_bystanders(tmp_path)
    sharded, single = _tiny(0), _tiny(1)
    sharded.save_pretrained(tmp_path, max_shard_size=20_000)
    shards = sorted(f.name for f in tmp_path.glob("model-0*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    _assert_same_weights(tmp_path, sharded)
    single.save_pretrained(tmp_path)  # sharded -> single: the old shards and index go, nothing else
    assert not any((tmp_path / s).exists() for s in shards) and not (tmp_path / "model.safetensors.index.json").exists()
    _assert_same_weights(tmp_path, single)
    sharded.save_pretrained(tmp_path, max_shard_size=20_000)  # single -> sharded: model.safetensors goes
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_weights(tmp_path, sharded)
    _assert_bystanders(tmp_path)
    assert not [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")], "temporary files left behind"


def _fail_after_first_weight_file(monkeypatch):
    real_save_file, calls = checkpoint_mod.save_file, []

    def save_then_fail(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise OSError("disk full (simulated, after the first file)")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_mod, "save_file", save_then_fail)


def _fail_writing_the_config(monkeypatch):
    def fail(path, text):
        raise OSError("disk full (simulated, at config.json)")

    monkeypatch.setattr(config_mod, "atomic_write_text", fail)


@pytest.mark.parametrize("fail", [_fail_after_first_weight_file, _fail_writing_the_config],
                         ids=["at-second-shard", "at-config"])  # fmt: skip
def test_interrupted_save_leaves_the_old_checkpoint_loading(tmp_path, monkeypatch, fail):
    old, new = _tiny(0), _tiny(1)
    old.save_pretrained(tmp_path, max_shard_size=20_000)
    _put_bystanders(tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    fail(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path, max_shard_size=20_000)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # not one byte changed, no temp file
    _assert_same_weights(tmp_path, old)


def test_overwriting_a_loaded_bin_does_not_change_or_crash_the_model(tmp_path):
    model = _tiny(0)
    model.config.save_pretrained(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    torch.save(model.state_dict(), path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(_tiny(1).state_dict(), path)  # same path, other weights (truncates the file first)
    with path.open("r+b") as f:  # and scribble over it in place
        f.seek(2000)
        f.write(b"\xff" * 4000)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    torch.save(loaded.state_dict(), path)  # saving the loaded model back over its own file
    assert torch.equal(torch.load(path, weights_only=True)["lm_head.weight"], model.lm_head.weight)


def test_convert_refuses_a_non_empty_directory_and_never_mixes_tokenizers(tmp_path, capsys):
    out = tmp_path / "out"
    _put_bystanders(out)
    assert cli_main(["convert", "default:glm", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err and str(out) in err
    assert sorted(f.name for f in out.iterdir()) == sorted(BYSTANDERS)
    assert cli_main(["convert", "default:glm", str(out), "--force"]) == 0
    assert (out / "tokenizer.json").is_file()
    assert cli_main(["convert", "default:xglm", str(out), "--force"]) == 0  # another family's tokenizer
    assert not (out / "tokenizer.json").exists(), "the old GLM tokenizer.json would shadow the XGLM tokenizer"
    _assert_bystanders(out)
    ref = AutoTokenizer.from_pretrained(bundled.path("xglm"))
    assert AutoTokenizer.from_pretrained(out)("To be, or not")["input_ids"] == ref("To be, or not")["input_ids"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "xglm"


def test_convert_from_sharded_to_single_leaves_no_stale_shards(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(bundled.path("glm"), src)
    model = AutoModelForCausalLM.from_pretrained(src)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size=200_000)
    assert cli_main(["convert", str(src), str(out), "--force"]) == 0
    assert not list(out.glob("model-*-of-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert set(load_file(out / "model.safetensors")) <= set(model.state_dict())


def test_train_refuses_a_non_empty_out_unless_forced(tmp_path, monkeypatch):
    data = tmp_path / "corpus.txt"
    data.write_text((bundled.path("glm").parent / "README.md").read_text() * 3)
    out = tmp_path / "run"
    _put_bystanders(out)
    with pytest.raises(FileExistsError, match=r"not empty.*--force"):
        train_mod.train(TrainOptions(data=data, out=out))
    saved = []
    monkeypatch.setattr(train_mod, "_setup", lambda opts, out, *_: saved.append(out) or (_ for _ in ()).throw(
        RuntimeError("stop after the directory check")))  # fmt: skip
    with pytest.raises(RuntimeError, match="stop after"):
        train_mod.train(TrainOptions(data=data, out=out, force=True))
    assert saved == [out]
    _assert_bystanders(out)


def test_train_save_replaces_an_old_checkpoint_without_mixing_files(tmp_path):
    out = tmp_path / "run"
    _put_bystanders(out)
    _tiny(0).save_pretrained(out, max_shard_size=20_000)  # an older checkpoint of another shape
    (out / "tokenizer.model").write_bytes(b"an old sentencepiece model")
    model = AutoModelForCausalLM.from_pretrained(bundled.path("glm"))
    tokenizer = AutoTokenizer.from_pretrained(bundled.path("glm"))
    train_mod.save_checkpoint(out, model, tokenizer, {"step": 1})
    assert not list(out.glob("model-*-of-*.safetensors")) and not (out / "tokenizer.model").exists()
    _assert_same_weights(out, model)
    _assert_bystanders(out)


def test_generation_reserves_no_more_than_the_context():
    model = AutoModelForCausalLM.from_pretrained("default:glm")
    context = model.config.max_position_embeddings
    assert reserved_length(model, 3, 3 + 10**8, "plain") == context
    assert reserved_length(model, 3, 30, "plain") == 30
    with pytest.raises(ValueError, match="max_new_tokens"):
        reserved_length(model, 3, 3 + 10**8, "static")
    ids = torch.tensor([[5, 6, 7]])
    first = int(model.generate(ids, max_new_tokens=1)[0, -1])
    # 10**8 new tokens would need ~25 GB of KV cache and 800 MB of ids if reserved up front
    out = model.generate(ids, max_new_tokens=10**8, eos_token_id=first)
    assert out.shape == (1, 4)
    with pytest.raises(ValueError, match=r"max_new_tokens.*max_position_embeddings \(2048\)"):
        model.generate(ids, max_new_tokens=10**8, cache_implementation="static")
