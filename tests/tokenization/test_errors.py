"""Bad input gives typed errors that name the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from glmkit.tokenization import AutoTokenizer, BatchEncoding, ChatGLM4Tokenizer, _resolve_dir


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        AutoTokenizer.from_pretrained(tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError, match="no usable tokenizer files"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError):
        _resolve_dir(tmp_path / "file.txt")
    assert _resolve_dir(tmp_path) == tmp_path


def test_unknown_class_and_bad_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    with pytest.raises(ValueError, match="unsupported tokenizer_class 'BertTokenizer'"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_corrupt_glm4_vocabulary(tmp_path, glm4_original_dir):
    shutil.copy(glm4_original_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    with open(tmp_path / "tokenizer.model", "a") as f:
        f.write("!!notbase64 12\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:\d+: expected 'base64-token rank'"):
        ChatGLM4Tokenizer.from_pretrained(tmp_path)


def test_call_errors(xglm_dirs, persimmon_dirs):
    tok = AutoTokenizer.from_pretrained(xglm_dirs["fast"])
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a", "a b c d"], return_tensors="pt")
    with pytest.raises(ValueError, match="padding must be"):
        tok("a", padding="sideways")
    with pytest.raises(ValueError, match="padding_side must be"):
        tok(["a", "b c"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="return_tensors"):
        tok("a", return_tensors="tf")
    with pytest.raises(TypeError, match="text must be"):
        tok([1, 2])
    with pytest.raises(TypeError, match="unexpected arguments"):
        tok("a", no_such_option=True)
    with pytest.raises(TypeError, match="batch_decode"):
        tok.decode([[1, 2], [3]])
    no_pad = AutoTokenizer.from_pretrained(persimmon_dirs["legacy"])
    assert no_pad.pad_token is None
    with pytest.raises(ValueError, match="no pad_token"):
        no_pad(["a", "b c"], padding=True)
    no_pad.pad_token = no_pad.eos_token
    assert no_pad(["a", "b c"], padding=True)["attention_mask"][0][0] == 1


def test_pad_method_and_batch_encoding(xglm_dirs):
    tok = AutoTokenizer.from_pretrained(xglm_dirs["slow"])
    rows = [tok("hello world"), tok("hi")]
    padded = tok.pad(rows, return_tensors="pt")
    assert padded["input_ids"].shape == padded["attention_mask"].shape
    assert padded["attention_mask"][1].tolist()[-1] == 0  # XGLM pads on the right
    enc = BatchEncoding({"input_ids": [1, 2]})
    assert enc.input_ids == [1, 2] and enc.data == {"input_ids": [1, 2]}
    import pickle

    assert pickle.loads(pickle.dumps(enc)) == enc
