"""XGLM in Flax/JAX (`pip install glmkit[flax]`): FlaxXGLMModel, FlaxXGLMForCausalLM."""

from .xglm import FlaxGenerateOutput, FlaxXGLMForCausalLM, FlaxXGLMModel, FlaxXGLMPreTrainedModel

__all__ = ["FlaxGenerateOutput", "FlaxXGLMForCausalLM", "FlaxXGLMModel", "FlaxXGLMPreTrainedModel"]
