"""A careless or hostile user's inputs: each raises a typed error whose message names the offending
argument, file or value (never a torch / tokenizers / sentencepiece error from deep inside, never a
silent wrong result). One catalogue, one row per case; a few behaviours are checked against the reference."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from glmkit import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GlmConfig,
    PersimmonConfig,
    XGLMConfig,
    bundled,
)
from glmkit.chat import ChatTemplateError, render
from glmkit.checkpoint import CheckpointError
from glmkit.cli import main as cli_main
from glmkit.config import ConfigError
from glmkit.modeling import InputError
from glmkit.tokenization import ChatGLM4Tokenizer, TokenizerFileError


@dataclass
class Env:
    model: Any
    tok: Any
    xglm_tok: Any
    persimmon_tok: Any
    tmp: Path
    capsys: Any

    def copy(self, family: str, name: str) -> Path:
        """A fresh copy of a bundled checkpoint to break."""
        target = self.tmp / name
        shutil.copytree(bundled.path(family), target)
        return target

    def truncated(self, family: str, file: str) -> Path:
        directory = self.copy(family, f"{family}-{file}-truncated")
        data = (directory / file).read_bytes()
        (directory / file).write_bytes(data[: len(data) // 2])
        return directory

    def with_config(self, **changes: Any) -> Path:
        directory = self.copy("glm", "config-" + "-".join(changes))
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
        return directory

    def cli(self, *args: str) -> str:
        """Run the CLI in process; it must fail with one line on stderr and no traceback."""
        assert cli_main(list(args)) == 1
        err = self.capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        raise RuntimeError(err)  # the catalogue checks the message


@pytest.fixture(scope="module")
def loaded():
    tokenizers = [AutoTokenizer.from_pretrained(f"default:{family}") for family in ("glm", "xglm", "persimmon")]
    return AutoModelForCausalLM.from_pretrained("default:glm"), *tokenizers


@pytest.fixture
def env(loaded, tmp_path, capsys) -> Env:
    return Env(*loaded, tmp_path, capsys)


IDS = torch.tensor([[5, 6, 7]])
ONE_TOKEN = {"max_new_tokens": 1}
USER = [{"role": "user", "content": "hi"}]


def _gen(**kwargs: Any) -> Callable[[Env], Any]:
    return lambda e: e.model.generate(IDS, **{**ONE_TOKEN, **kwargs})


def _tiktoken(e: Env) -> Any:
    path = e.tmp / "tokenizer.model"
    path.write_bytes(b"IQ== 0\nISE= not-a-rank\n")
    return ChatGLM4Tokenizer(path)


def _bin_not_a_checkpoint(e: Env) -> Any:
    directory = e.copy("glm", "bin")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a torch archive")
    return AutoModelForCausalLM.from_pretrained(directory)


def _unreachable_hub(e: Env, monkeypatch: pytest.MonkeyPatch) -> Any:
    import huggingface_hub

    def offline(self, repo_id, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return AutoModelForCausalLM.from_pretrained("org/not-cached", cache_dir=str(e.tmp / "empty-cache"))


# (id, call, exception type, text the message must contain: the argument / file / value)
CASES: list[tuple[str, Callable[..., Any], type[BaseException], str]] = [
    # ---- forward: ids, masks, positions, embeddings, labels ---------------------------------------------------
    ("forward-float-ids", lambda e: e.model(torch.tensor([[1.0, 2.0]])), TypeError, "input_ids"),
    ("forward-list-ids", lambda e: e.model([[1, 2]]), TypeError, "input_ids"),
    ("forward-bool-ids", lambda e: e.model(torch.ones(1, 2, dtype=torch.bool)), TypeError, "input_ids"),
    ("forward-1d-ids", lambda e: e.model(torch.tensor([1, 2])), InputError, "input_ids"),
    ("forward-empty-ids", lambda e: e.model(torch.zeros(1, 0, dtype=torch.long)), InputError, "input_ids"),
    ("forward-id-past-vocab", lambda e: e.model(torch.tensor([[1, 99999]])), InputError, "99999"),
    ("forward-negative-id", lambda e: e.model(torch.tensor([[1, -1]])), InputError, "-1"),
    ("forward-ids-and-embeds", lambda e: e.model(IDS, inputs_embeds=torch.zeros(1, 3, 128)), InputError, "input_ids"),
    ("mask-all-zero", lambda e: e.model(IDS, attention_mask=torch.zeros(1, 3)), InputError, "attention_mask"),
    ("mask-all-zero-batch", lambda e: e.model(IDS.repeat(2, 1), attention_mask=torch.zeros(2, 3)), InputError,
     "attention_mask is all zeros"),
    ("mask-shorter-than-ids", lambda e: e.model(IDS, attention_mask=torch.ones(1, 2)), InputError, "attention_mask"),
    ("mask-longer-than-ids", lambda e: e.model(IDS, attention_mask=torch.ones(1, 5)), InputError, "attention_mask"),
    ("mask-wrong-batch", lambda e: e.model(IDS, attention_mask=torch.ones(2, 3)), InputError, "attention_mask"),
    ("mask-list", lambda e: e.model(IDS, attention_mask=[[1, 1, 1]]), TypeError, "attention_mask"),
    ("position-ids-wrong-length", lambda e: e.model(IDS, position_ids=torch.tensor([[0, 1]])), InputError,
     "position_ids"),
    ("position-ids-negative", lambda e: e.model(IDS, position_ids=torch.tensor([[-1, 0, 1]])), InputError,
     "position_ids"),
    ("position-ids-float", lambda e: e.model(IDS, position_ids=torch.tensor([[0.0, 1.0, 2.0]])), TypeError,
     "position_ids"),
    ("embeds-wrong-width", lambda e: e.model(inputs_embeds=torch.zeros(1, 3, 7)), InputError, "inputs_embeds"),
    ("embeds-2d", lambda e: e.model(inputs_embeds=torch.zeros(3, 128)), InputError, "inputs_embeds"),
    ("embeds-integer", lambda e: e.model(inputs_embeds=torch.zeros(1, 3, 128, dtype=torch.long)), TypeError,
     "inputs_embeds"),
    ("labels-past-vocab", lambda e: e.model(IDS, labels=torch.tensor([[1, 99999, 2]])), InputError, "99999"),
    ("labels-negative", lambda e: e.model(IDS, labels=torch.tensor([[1, -5, 2]])), InputError, "labels"),
    ("labels-float", lambda e: e.model(IDS, labels=torch.ones(1, 3)), TypeError, "labels"),
    ("labels-wrong-shape", lambda e: e.model(IDS, labels=torch.ones(1, 2, dtype=torch.long)), ValueError, "labels"),
    ("seq-cls-label-past-num-labels", lambda e: AutoModelForSequenceClassification.from_pretrained(
        "default:glm", num_labels=2)(IDS, labels=torch.tensor([5])), InputError, "labels"),
    ("token-cls-label-past-num-labels", lambda e: AutoModelForTokenClassification.from_pretrained(
        "default:glm", num_labels=2)(IDS, labels=torch.tensor([[0, 1, 7]])), InputError, "7"),
    # ---- generate: prompts ------------------------------------------------------------------------------------
    ("generate-list-ids", lambda e: e.model.generate([[5, 6]], max_new_tokens=1), TypeError, "input_ids"),
    ("generate-float-ids", lambda e: e.model.generate(IDS.float(), max_new_tokens=1), TypeError, "input_ids"),
    ("generate-empty-prompt", lambda e: e.model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1),
     ValueError, "input_ids is empty"),
    ("generate-no-ids", lambda e: e.model.generate(max_new_tokens=1), ValueError, "input_ids"),
    ("generate-id-past-vocab", lambda e: e.model.generate(torch.tensor([[5, 99999]]), max_new_tokens=1), InputError,
     "99999"),
    ("generate-mask-all-zero", _gen(attention_mask=torch.zeros(1, 3, dtype=torch.long)), InputError, "attention_mask"),
    ("generate-mask-one-row-zero", lambda e: e.model.generate(IDS.repeat(2, 1), max_new_tokens=1,
                                                              attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])),
     InputError, "attention_mask row 1"),
    ("generate-mask-shorter", _gen(attention_mask=torch.ones(1, 2, dtype=torch.long)), InputError, "attention_mask"),
    ("stream-empty-prompt", lambda e: next(e.model.stream(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1)),
     ValueError, "input_ids"),
    # ---- generate: lengths ------------------------------------------------------------------------------------
    ("max-new-tokens-zero", _gen(max_new_tokens=0), ValueError, "max_new_tokens"),
    ("max-new-tokens-negative", _gen(max_new_tokens=-3), ValueError, "max_new_tokens"),
    ("max-new-tokens-float", _gen(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    ("max-new-tokens-string", _gen(max_new_tokens="5"), TypeError, "max_new_tokens"),
    ("max-new-tokens-bool", _gen(max_new_tokens=True), TypeError, "max_new_tokens"),
    ("max-new-tokens-absurd-static", _gen(max_new_tokens=10**8, cache_implementation="static"), ValueError,
     "max_new_tokens"),
    ("max-new-tokens-absurd-beam", _gen(max_new_tokens=10**8, num_beams=2), ValueError, "max_new_tokens"),
    ("max-length-below-prompt", lambda e: e.model.generate(IDS, max_length=2), ValueError, "max_length"),
    ("max-length-equal-prompt", lambda e: e.model.generate(IDS, max_length=3), ValueError, "max_length"),
    ("min-new-tokens-negative", _gen(min_new_tokens=-1), ValueError, "min_new_tokens"),
    ("num-return-sequences-zero", _gen(num_return_sequences=0), ValueError, "num_return_sequences"),
    ("num-beams-zero", _gen(num_beams=0), ValueError, "num_beams"),
    # ---- generate: token ids and typed settings -------------------------------------------------------------
    ("eos-past-vocab", _gen(eos_token_id=99999), ValueError, "eos_token_id"),
    ("eos-negative", _gen(eos_token_id=-1), ValueError, "eos_token_id"),
    ("eos-string", _gen(eos_token_id="2"), TypeError, "eos_token_id"),
    ("pad-past-vocab", _gen(pad_token_id=99999), ValueError, "pad_token_id"),
    ("bad-words-past-vocab", _gen(bad_words_ids=[[99999]]), ValueError, "bad_words_ids"),
    ("bad-words-empty-sequence", _gen(bad_words_ids=[[]]), ValueError, "bad_words_ids"),
    ("bad-words-flat-list", _gen(bad_words_ids=[5, 6]), ValueError, "bad_words_ids"),
    ("temperature-string", _gen(do_sample=True, temperature="0.7"), TypeError, "temperature"),
    ("temperature-zero", _gen(do_sample=True, temperature=0.0), ValueError, "temperature"),
    ("top-k-float", _gen(do_sample=True, top_k=2.5), TypeError, "top_k"),
    ("top-p-above-one", _gen(do_sample=True, top_p=1.5), ValueError, "top_p"),
    ("do-sample-string", _gen(do_sample="yes"), TypeError, "do_sample"),
    ("repetition-penalty-zero", _gen(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    ("unknown-generate-keyword", _gen(max_new_token=5), TypeError, "max_new_token"),
    ("stop-strings-without-tokenizer", _gen(stop_strings=["\n"]), ValueError, "stop_strings"),
    ("cache-implementation-unknown", _gen(cache_implementation="paged"), ValueError, "cache_implementation"),
    # ---- loading: keywords, dtype, device, files ------------------------------------------------------------
    ("from-pretrained-misspelled-dtype", lambda e: AutoModelForCausalLM.from_pretrained(
        "default:glm", torch_dtpye="float16"), TypeError, "torch_dtpye"),
    ("from-pretrained-unknown-keyword", lambda e: AutoModelForCausalLM.from_pretrained(
        "default:glm", frobnicate=True), TypeError, "frobnicate"),
    ("from-config-unknown-keyword", lambda e: AutoModelForCausalLM.from_config(e.model.config, num_layer=2),
     TypeError, "num_layer"),
    ("dtype-unknown", lambda e: AutoModelForCausalLM.from_pretrained("default:glm", dtype="float17"), ValueError,
     "float17"),
    ("dtype-integer", lambda e: AutoModelForCausalLM.from_pretrained("default:glm", dtype=torch.int8), ValueError,
     "int8"),
    ("device-map-nonsense", lambda e: AutoModelForCausalLM.from_pretrained("default:glm", device_map="gpu0"),
     ValueError, "gpu0"),
    ("missing-directory", lambda e: AutoModelForCausalLM.from_pretrained(e.tmp / "nope"), FileNotFoundError, "nope"),
    ("config-not-json", lambda e: AutoModelForCausalLM.from_pretrained(e.truncated("glm", "config.json")),
     ConfigError, "config.json"),
    ("weights-truncated", lambda e: AutoModelForCausalLM.from_pretrained(e.truncated("glm", "model.safetensors")),
     CheckpointError, "model.safetensors"),
    ("bin-not-a-checkpoint", _bin_not_a_checkpoint, CheckpointError, "pytorch_model.bin"),
    ("config-zero-heads", lambda e: AutoModelForCausalLM.from_pretrained(e.with_config(num_attention_heads=0)),
     ConfigError, "num_attention_heads"),
    ("config-string-number", lambda e: AutoModelForCausalLM.from_pretrained(e.with_config(hidden_size="128")),
     ConfigError, "hidden_size"),
    ("config-pad-past-vocab", lambda e: AutoModelForCausalLM.from_pretrained(e.with_config(pad_token_id=5000)),
     ConfigError, "pad_token_id"),
    ("config-kv-heads-do-not-divide", lambda e: GlmConfig(num_attention_heads=4, num_key_value_heads=3), ConfigError,
     "num_key_value_heads"),
    ("config-string-eps", lambda e: PersimmonConfig(layer_norm_eps="1e-5"), ConfigError, "layer_norm_eps"),
    ("config-xglm-heads-do-not-divide", lambda e: XGLMConfig(d_model=100, attention_heads=3), ConfigError,
     "attention heads"),
    ("config-negative-vocab", lambda e: XGLMConfig(vocab_size=-1), ConfigError, "vocab_size"),
    # ---- tokenizers -------------------------------------------------------------------------------------------
    ("tokenizer-json-truncated", lambda e: AutoTokenizer.from_pretrained(e.truncated("glm", "tokenizer.json")),
     TokenizerFileError, "tokenizer.json"),
    ("sentencepiece-truncated", lambda e: AutoTokenizer.from_pretrained(
        e.truncated("xglm", "sentencepiece.bpe.model")), TokenizerFileError, "sentencepiece.bpe.model"),
    ("llama-sentencepiece-truncated", lambda e: AutoTokenizer.from_pretrained(
        e.truncated("persimmon", "tokenizer.model")), TokenizerFileError, "tokenizer.model"),
    ("tokenizer-config-truncated", lambda e: AutoTokenizer.from_pretrained(
        e.truncated("glm", "tokenizer_config.json")), TokenizerFileError, "tokenizer_config.json"),
    ("tiktoken-vocab-bad-line", _tiktoken, TokenizerFileError, "tokenizer.model:2"),
    ("decode-past-vocab-fast", lambda e: e.tok.decode([5, 99999]), ValueError, "99999"),
    ("decode-past-vocab-sentencepiece", lambda e: e.xglm_tok.decode([99999]), ValueError, "99999"),
    ("decode-past-vocab-llama", lambda e: e.persimmon_tok.decode([99999]), ValueError, "99999"),
    ("decode-negative-id", lambda e: e.xglm_tok.decode([-1]), ValueError, "-1"),
    ("decode-float-id", lambda e: e.tok.decode([1.5]), TypeError, "1.5"),
    ("batch-decode-past-vocab", lambda e: e.tok.batch_decode([[1], [99999]]), ValueError, "99999"),
    # ---- chat templates ---------------------------------------------------------------------------------------
    ("chat-content-none", lambda e: e.tok.apply_chat_template([{"role": "user", "content": None}], tokenize=False),
     ValueError, "message 0"),
    ("chat-image-part", lambda e: e.tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}], tokenize=False), ValueError, "image"),
    ("chat-content-number", lambda e: e.tok.apply_chat_template([{"role": "user", "content": 5}], tokenize=False),
     TypeError, "message 0"),
    ("chat-no-role", lambda e: e.tok.apply_chat_template([{"content": "hi"}], tokenize=False), ValueError, "role"),
    ("chat-not-a-list", lambda e: e.tok.apply_chat_template("hi", tokenize=False), TypeError, "messages"),
    ("template-never-terminates", lambda e: render(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", USER),
     ChatTemplateError, "loop steps"),
    ("template-huge-power", lambda e: render("{{ 10 ** 10 ** 10 }}", USER), ChatTemplateError, "10000000000 ** 10"),
    ("template-huge-repeat", lambda e: render("{{ 'x' * 10 ** 9 }}", USER), ChatTemplateError, "1000000000"),
    ("template-endless-recursion", lambda e: render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", USER),
     ChatTemplateError, "RecursionError"),
    ("template-syntax-error", lambda e: render("{% for %}", USER), ChatTemplateError, "syntax error"),
    # ---- CLI and hub ------------------------------------------------------------------------------------------
    ("cli-device-cuda-without-cuda", lambda e: e.cli("generate", "hi", "--device", "cuda", "--max-new-tokens", "1"),
     RuntimeError, "CUDA is not available"),
    ("cli-train-device-cuda-without-cuda", lambda e: e.cli("train", "--data", str(e.tmp / "none.txt"), "--out",
                                                           str(e.tmp / "run"), "--device", "cuda"),
     RuntimeError, "CUDA is not available"),
    ("cli-max-new-tokens-zero", lambda e: e.cli("generate", "hi", "--max-new-tokens", "0"), RuntimeError,
     "max_new_tokens"),
    ("cli-convert-into-non-empty", lambda e: (e.tmp / "keep.txt").write_text("x") and e.cli(
        "convert", "default:glm", str(e.tmp)), RuntimeError, "--force"),
    ("hub-unreachable", _unreachable_hub, FileNotFoundError, "unreachable"),
]


@pytest.mark.parametrize(("case", "call", "error", "named"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(env, monkeypatch, case, call, error, named):
    if "without-cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if case == "hub-unreachable":
        pytest.importorskip("huggingface_hub")
    with pytest.raises(error) as caught:
        call(env, monkeypatch) if case == "hub-unreachable" else call(env)
    assert named in str(caught.value), f"{case}: the message does not name {named!r}: {caught.value}"


def test_the_catalogue_covers_the_issue():
    """Issue 21 lists the kinds of bad input; the catalogue has at least one case of each, and its size is
    what the closing note reports."""
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 90


# ---- silent wrong results that now behave as the reference does ---------------------------------------------


def test_no_repeat_ngram_size_zero_or_negative_is_ignored_as_in_the_reference(loaded):
    model = loaded[0]
    plain = model.generate(IDS, max_new_tokens=12)
    for size in (0, -1, -5):
        assert torch.equal(model.generate(IDS, max_new_tokens=12, no_repeat_ngram_size=size), plain)


def test_default_max_length_means_twenty_new_tokens_as_in_the_reference(loaded):
    transformers = pytest.importorskip("transformers")
    model = loaded[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(bundled.path("glm"))
    prompt = torch.arange(5, 30)[None]  # longer than the default max_length (20)
    ours = model.generate(prompt, eos_token_id=None)
    ref = theirs.generate(prompt, eos_token_id=None, pad_token_id=0, do_sample=False)
    assert ours.shape == ref.shape == (1, 45) and torch.equal(ours, ref)


def test_positions_past_the_context_are_reported(loaded, caplog):
    model = type(loaded[0]).from_pretrained("default:glm")
    import glmkit.modeling as modeling

    modeling._WARNED_CONTEXT.discard((type(model).__name__, model.config.max_position_embeddings))
    with caplog.at_level(logging.WARNING, logger="glmkit"):
        model(IDS, position_ids=torch.tensor([[5000, 5001, 5002]]))
    assert "max_position_embeddings (2048)" in caplog.text
