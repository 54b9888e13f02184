"""XGLM in TensorFlow (`pip install glmkit[tf]`): TFXGLMModel, TFXGLMForCausalLM (Keras 2 through tf-keras)."""

from .xglm import TFXGLMForCausalLM, TFXGLMModel, TFXGLMPreTrainedModel

__all__ = ["TFXGLMForCausalLM", "TFXGLMModel", "TFXGLMPreTrainedModel"]
