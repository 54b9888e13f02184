"""Decoding: GenerationConfig, logits processors, stop strings, streamers, generate()."""

from .config import GenerationConfig
from .constraints import DisjunctiveConstraint, PhrasalConstraint
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .utils import GenerateDecoderOnlyOutput, GenerationMixin, StreamChunk, decode_steps, stream

__all__ = [
    "BaseStreamer",
    "DisjunctiveConstraint",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "GenerationMixin",
    "PhrasalConstraint",
    "StreamChunk",
    "TextIteratorStreamer",
    "TextStreamer",
    "decode_steps",
    "stream",
]
