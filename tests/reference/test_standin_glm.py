"""glmkit's stand-in for transformers' tests/models/glm/test_modeling_glm.py (absent from the PyPI sdist; see
standin_family.py): GLM's tiny tester for upstream's ModelTesterMixin and ConfigTester."""

import unittest

from glmkit import GlmConfig, GlmForCausalLM, GlmForSequenceClassification, GlmForTokenClassification, GlmModel

from .standin_family import StandInClassificationTests, StandInFamilyTests, StandInModelTester


class GlmModelTester(StandInModelTester):
    config_class = GlmConfig
    base_model_class = GlmModel
    causal_lm_class = GlmForCausalLM
    sequence_classification_class = GlmForSequenceClassification
    token_classification_class = GlmForTokenClassification

    def get_config(self) -> GlmConfig:
        return GlmConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=2, head_dim=self.hidden_size // self.num_attention_heads, hidden_act="gelu",
            max_position_embeddings=self.max_position_embeddings, initializer_range=self.initializer_range,
            tie_word_embeddings=False, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )  # fmt: skip


class GlmModelTest(StandInClassificationTests, StandInFamilyTests, unittest.TestCase):
    test_head_masking = False  # as in upstream's family file: transformers' model takes no head_mask either
    model_tester_class = GlmModelTester
