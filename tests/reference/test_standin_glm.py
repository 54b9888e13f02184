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
    config_extra = {"num_key_value_heads": 2, "head_dim": 32 // 4}  # hidden_size // num_attention_heads


class GlmModelTest(StandInClassificationTests, StandInFamilyTests, unittest.TestCase):
    test_head_masking = False  # as in upstream's family file: transformers' model takes no head_mask either
    model_tester_class = GlmModelTester
