"""Weight-only int8 / int4 quantization: quantized linears on ATen's CPU kernels, applied as a module swap."""

from .linear import Int4Linear, Int8Embedding, Int8Linear
from .loading import prepare_loading
from .quantize import QuantSpec, quantize_, resolve_spec

__all__ = ["Int4Linear", "Int8Embedding", "Int8Linear", "prepare_loading", "QuantSpec", "quantize_", "resolve_spec"]
