"""Decoding: GenerationConfig, logits processors, stop strings, streamers, generate()."""

from .config import GenerationConfig
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .utils import GenerateDecoderOnlyOutput, GenerationMixin, StreamChunk, decode_steps, stream

__all__ = [
    "BaseStreamer",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "GenerationMixin",
    "StreamChunk",
    "TextIteratorStreamer",
    "TextStreamer",
    "decode_steps",
    "stream",
]
