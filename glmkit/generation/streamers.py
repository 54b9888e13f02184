"""Streamers with the reference's semantics: `put` token ids as they come, `end` when done."""

from __future__ import annotations

from queue import Queue
from typing import Any

from ..tokenization.detokenizer import streaming_detokenizer


def _is_cjk(cp: int) -> bool:
    """CJK ideographs print as soon as they arrive (no spaces to wait for)."""
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )  # fmt: skip


class BaseStreamer:
    def put(self, value: Any) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Prints text as whole words become available (batch size 1). The first `put` is the prompt,
    skipped when skip_prompt=True; extra keywords go to tokenizer.decode.

    The chunks are the reference's (print up to the last space, flush at a newline, CJK at once),
    computed on a streaming detokenizer instead of re-decoding all the ids at every `put`."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        kwargs = dict(decode_kwargs)
        self._detok = streaming_detokenizer(tokenizer, kwargs.pop("skip_special_tokens", False), **kwargs)
        self.next_tokens_are_prompt = True
        self._restart()

    def _restart(self) -> None:
        """Start a new text (the reference empties its token cache here)."""
        self._detok.reset()
        self._n_ids = 0  # ids in the current text
        self.print_len = 0  # characters of the current text printed so far
        self._start = 0  # where `_tail` starts in the text: min(print_len, what is final)
        self._tail = ""  # final text from `_start` on
        self._before = ""  # the character before `_start`

    def put(self, value: Any) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TextStreamer only supports batch size 1")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        ids = value.tolist()
        self._n_ids += len(ids)
        self._tail += self._detok.add_many(ids)
        text = self._tail + self._detok.peek()  # the reference's decode(ids)[self._start:]
        last, printed = text[-1:] or self._before, self.print_len - self._start
        if last == "\n":
            printable = text[printed:]
            self._restart()
        elif last and _is_cjk(ord(last)):
            printable = text[printed:]
            self.print_len += len(printable)
        else:  # hold back a partial word: it may still change
            printable = text[printed : text.rfind(" ") + 1]
            self.print_len += len(printable)
        drop = min(self.print_len - self._start, len(self._tail))
        if drop > 0:
            self._before, self._tail, self._start = self._tail[drop - 1], self._tail[drop:], self._start + drop
        self.on_finalized_text(printable)

    def end(self) -> None:
        printable = ""
        if self._n_ids:
            printable = (self._tail + self._detok.finalize())[self.print_len - self._start :]
            self._restart()
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Queue the text so another thread can iterate over it: `for text in streamer: ...`."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value == self.stop_signal:
            raise StopIteration()
        return value
