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


class PersimmonModelTest(StandInClassificationTests, StandInFamilyTests, unittest.TestCase):
    test_head_masking = False  # as in upstream's family file: transformers' model takes no head_mask either
    model_tester_class = PersimmonModelTester
