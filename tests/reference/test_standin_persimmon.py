"""glmkit's stand-in for transformers' tests/models/persimmon/test_modeling_persimmon.py (absent from the PyPI
sdist; see standin_family.py): Persimmon's tiny tester for upstream's ModelTesterMixin and ConfigTester."""

import unittest

from glmkit import (
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
    PersimmonModel,
)

from .standin_family import StandInClassificationTests, StandInFamilyTests, StandInModelTester


class PersimmonModelTester(StandInModelTester):
    config_class = PersimmonConfig
    base_model_class = PersimmonModel
    causal_lm_class = PersimmonForCausalLM
    sequence_classification_class = PersimmonForSequenceClassification
    token_classification_class = PersimmonForTokenClassification

    def get_config(self) -> PersimmonConfig:
        return PersimmonConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads, hidden_act="gelu",
            max_position_embeddings=self.max_position_embeddings, initializer_range=self.initializer_range,
            tie_word_embeddings=False, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )  # fmt: skip


class PersimmonModelTest(StandInClassificationTests, StandInFamilyTests, unittest.TestCase):
    test_head_masking = False  # as in upstream's family file: transformers' model takes no head_mask either
    model_tester_class = PersimmonModelTester
