"""The original GLM-4 vocabulary converted to tokenizer.json (what `glmkit convert` writes) tokenizes as the
tiktoken-based remote code does, and transformers loads it without remote code."""

from __future__ import annotations

import transformers

from glmkit.tokenization import AutoTokenizer, ChatGLM4Tokenizer, FastTokenizer

from .corpus import PREFIXED, STRINGS, load_reference


def test_to_fast_encodes_like_the_remote_code(glm4_original_dir, corpus, tmp_path):
    slow = AutoTokenizer.from_pretrained(glm4_original_dir)
    assert isinstance(slow, ChatGLM4Tokenizer)
    slow.to_fast().save_pretrained(tmp_path)
    ref = load_reference("remote", glm4_original_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)  # tokenizer.json, no remote code
    ours = AutoTokenizer.from_pretrained(tmp_path)
    assert type(theirs) is transformers.PreTrainedTokenizerFast and type(ours) is FastTokenizer
    assert len(theirs) == len(ref) and theirs.eos_token == ref.eos_token and theirs.padding_side == "left"
    prefix = ref.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    texts = STRINGS + corpus[:200]
    for text in texts:
        want = ref(text, add_special_tokens=False)["input_ids"]
        assert theirs(text, add_special_tokens=False)["input_ids"] == want, text
        assert ours(text, add_special_tokens=False)["input_ids"] == want, text
        if text not in PREFIXED:
            assert theirs(text)["input_ids"] == prefix + want, text
        assert ours.decode(want) == theirs.decode(want), text
        if not any(special in text for special in ref.additional_special_tokens):  # slow decode pads specials
            assert theirs.decode(want) == ref.decode(want), text
    chat = [{"role": "user", "content": "hi"}]
    assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        slow.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
