"""glmkit's stand-in for transformers' tests/models/xglm/test_modeling_xglm.py (absent from the PyPI sdist; see
standin_family.py): XGLM's tiny tester for upstream's ModelTesterMixin and ConfigTester. XGLM's config has its own
keyword names (d_model, ffn_dim, num_layers, attention_heads, init_std) and ids 0 / 1 / 2 for bos / pad / eos."""

import unittest

from glmkit import XGLMConfig, XGLMForCausalLM, XGLMModel

from .standin_family import StandInFamilyTests, StandInModelTester


class XGLMModelTester(StandInModelTester):
    config_class = XGLMConfig
    base_model_class = XGLMModel
    causal_lm_class = XGLMForCausalLM
    pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

    def get_config(self) -> XGLMConfig:
        return XGLMConfig(
            vocab_size=self.vocab_size, d_model=self.hidden_size, ffn_dim=self.intermediate_size,
            num_layers=self.num_hidden_layers, attention_heads=self.num_attention_heads,
            activation_function="gelu", activation_dropout=0.1, attention_dropout=0.1,
            max_position_embeddings=self.max_position_embeddings, init_std=self.initializer_range,
            pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )  # fmt: skip

    def prepare_input_ids(self):
        return super().prepare_input_ids().clamp(3)  # no special tokens in the inputs

    def prepare_attention_mask(self):
        return None  # the mixin's inputs are input_ids alone, as for upstream's XGLM tester


class XGLMModelTest(StandInFamilyTests, unittest.TestCase):
    model_tester_class = XGLMModelTester
    config_tester_kwargs = {"n_embd": 37}  # a key XGLM's config does not know: it must survive the JSON round trips
