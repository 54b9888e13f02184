"""Bad checkpoints and bad input give typed errors that name the problem, before any heavy work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmkit
from glmkit import CheckpointError, ConfigError, GlmConfig, GlmForCausalLM, InputError

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, pad_token_id=0,
)  # fmt: skip


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    GlmForCausalLM(GlmConfig(**TINY)).save_pretrained(tmp_path)
    return tmp_path


def edit_weights(path, fn):
    weights = load_file(path / "model.safetensors")
    fn(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_token_id_out_of_range(ckpt):
    model = GlmForCausalLM.from_pretrained(ckpt)
    with pytest.raises(InputError, match="token id 64 is outside the vocabulary"):
        model(torch.tensor([[1, 2, 64]]))
    with pytest.raises(InputError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_ids_and_embeds_exclusive(ckpt):
    model = GlmForCausalLM.from_pretrained(ckpt)
    with pytest.raises(InputError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_attention_mask_shape(ckpt):
    model = GlmForCausalLM.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(2, 3))


def test_unknown_model_type_lists_supported(ckpt):
    edit_config(ckpt, lambda c: c.update(model_type="llama"))
    with pytest.raises(
        ConfigError, match=r"unknown model_type 'llama'; glmkit supports: glm, persimmon, xglm"
    ):
        glmkit.AutoModelForCausalLM.from_pretrained(ckpt)
    with pytest.raises(ConfigError, match="GlmConfig expects model_type 'glm'"):
        GlmForCausalLM.from_pretrained(ckpt)


def test_missing_weight_named(ckpt):
    edit_weights(ckpt, lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights: model\.layers\.1\.mlp\.down_proj\.weight"):
        GlmForCausalLM.from_pretrained(ckpt)


def test_missing_untied_lm_head_is_an_error(ckpt):
    edit_weights(ckpt, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights: lm_head\.weight"):
        GlmForCausalLM.from_pretrained(ckpt)


def test_unexpected_weight_named(ckpt):
    edit_weights(ckpt, lambda w: w.update({"model.layers.2.mlp.down_proj.weight": torch.zeros(2)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected weights: model\.layers\.2\.mlp\.down_proj\.weight"
    ):
        GlmForCausalLM.from_pretrained(ckpt)


def test_wrong_shape_named(ckpt):
    edit_weights(ckpt, lambda w: w.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(
        CheckpointError, match=r"wrong shapes: model\.norm\.weight \(checkpoint \(31,\), model \(32,\)\)"
    ):
        GlmForCausalLM.from_pretrained(ckpt)


def test_malformed_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        GlmForCausalLM.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        glmkit.AutoConfig.from_pretrained(ckpt)


def test_config_without_model_type(ckpt):
    edit_config(ckpt, lambda c: c.pop("model_type"))
    with pytest.raises(ConfigError, match="has no model_type"):
        glmkit.AutoModelForCausalLM.from_pretrained(ckpt)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GlmForCausalLM.from_pretrained(tmp_path / "nope")
    GlmConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights in"):
        GlmForCausalLM.from_pretrained(tmp_path)


def test_missing_shard_named(ckpt):
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        GlmForCausalLM.from_pretrained(ckpt)


@pytest.mark.parametrize("key,value,message", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn' is not implemented"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
    ("sliding_window", 4096, "sliding_window=4096 changes the model's math"),
    ("hidden_act", "swiglu_unknown", "unknown activation 'swiglu_unknown'"),
    ("num_key_value_heads", 3, "must be a multiple of num_key_value_heads"),
    ("problem_type", "ranking", "problem_type must be"),
])  # fmt: skip
def test_math_changing_config_rejected(ckpt, key, value, message):
    edit_config(ckpt, lambda c: c.update({key: value}))
    with pytest.raises(ValueError, match=message):
        GlmForCausalLM.from_pretrained(ckpt)


def test_unknown_harmless_keys_kept(ckpt):
    edit_config(ckpt, lambda c: c.update(my_note="hello", sliding_window=None))
    model = GlmForCausalLM.from_pretrained(ckpt)
    assert model.config.my_note == "hello"
    model.save_pretrained(ckpt / "again")
    assert json.loads((ckpt / "again" / "config.json").read_text())["my_note"] == "hello"


def test_bad_dtype_and_device(ckpt):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        GlmForCausalLM.from_pretrained(ckpt, dtype="float8")
    with pytest.raises(ValueError, match="device_map leaves modules unplaced: model.layers.0"):
        GlmForCausalLM.from_pretrained(ckpt, device_map={"model.embed_tokens": "cpu"})
    with pytest.raises(ValueError, match="attn_implementation must be"):
        GlmForCausalLM.from_pretrained(ckpt, attn_implementation="flash_attention_9")


def test_bin_checkpoint_with_pickled_code_refused(tmp_path):
    """weights_only=True: a .bin that would run code on load is refused, not executed."""

    class Evil:
        def __reduce__(self):
            return (exec, ("import sys; sys.modules['glmkit']._pwned = True",))

    GlmConfig(**TINY).save_pretrained(tmp_path)
    torch.save({"lm_head.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        GlmForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(glmkit, "_pwned")


def test_meta_build_loads_with_no_random_init(ckpt, monkeypatch):
    """from_pretrained builds on the meta device: the init routine never touches real storage."""
    calls = []
    original = torch.Tensor.normal_

    def spy(self, *args, **kwargs):
        calls.append(self.device.type)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", spy)
    GlmForCausalLM.from_pretrained(ckpt)
    assert set(calls) <= {"meta"}  # module constructors may init on meta: free
    GlmForCausalLM(GlmConfig(**TINY))  # a model built from a config is initialised
    assert "cpu" in calls


def test_saved_weights_get_ordinary_file_permissions(tmp_path):
    """save_pretrained's weight files follow the umask like config.json (safetensors alone writes 0600)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        model = GlmForCausalLM(GlmConfig(**TINY))
        model.save_pretrained(tmp_path / "one")
        model.save_pretrained(tmp_path / "sharded", max_shard_size=20_000)
    finally:
        os.umask(old)
    files = [*(tmp_path / "one").iterdir(), *(tmp_path / "sharded").glob("*.safetensors")]
    assert len(files) > 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
