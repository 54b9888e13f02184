"""glmkit's stand-ins for transformers' family test files (tests/models/{glm,xglm,persimmon}/test_modeling_*.py and
the causal_lm_tester.py they build on), which the transformers 4.56.2 sdist on PyPI does not ship.

This is glmkit's code, not upstream's. It only does what those files do around the mixins: a model tester with
tiny shapes (batch 13, seq 7, vocab 99, hidden 32, 2 layers, 4 heads) that builds configs and inputs, and a test
class per family that mixes in upstream's real ModelTesterMixin and runs upstream's real ConfigTester; the tests
are theirs. conftest.py collects a family's stand-in module only where upstream's own family file is absent.
"""

from __future__ import annotations

import torch
from tests.test_configuration_common import ConfigTester
from tests.test_modeling_common import ModelTesterMixin, ids_tensor
from transformers.testing_utils import torch_device


class StandInModelTester:
    """Builds a family's tiny config and inputs for the mixins; subclasses name the family's classes and pass the
    shapes under their config's own keyword names (`get_config`)."""

    config_class: type
    base_model_class: type
    causal_lm_class: type
    sequence_classification_class: type | None = None
    token_classification_class: type | None = None
    config_extra: dict = {}  # family-specific config keywords on top of the common ones (see get_config)

    batch_size = 13
    seq_length = 7
    vocab_size = 99
    hidden_size = 32
    num_hidden_layers = 2
    num_attention_heads = 4
    intermediate_size = 37
    max_position_embeddings = 512
    initializer_range = 0.02
    num_labels = 3
    type_sequence_label_size = 2
    is_training = True
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, parent):
        self.parent = parent

    @property
    def all_model_classes(self) -> tuple[type, ...]:
        classes = (self.base_model_class, self.causal_lm_class, self.sequence_classification_class,
                   self.token_classification_class)  # fmt: skip
        return tuple(c for c in classes if c is not None)

    def get_config(self):
        """The config under the common (Llama-style) keyword names GLM and Persimmon share, plus the family's
        `config_extra`; a family with other names (XGLM) overrides this."""
        return self.config_class(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads, hidden_act="gelu",
            max_position_embeddings=self.max_position_embeddings, initializer_range=self.initializer_range,
            tie_word_embeddings=False, pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, **self.config_extra,
        )  # fmt: skip

    def prepare_input_ids(self) -> torch.Tensor:
        return ids_tensor([self.batch_size, self.seq_length], self.vocab_size)

    def prepare_attention_mask(self) -> torch.Tensor | None:
        """Right-padded rows of every length 1..seq_length, as upstream's CausalLMModelTester builds them."""
        return torch.ones(self.batch_size, self.seq_length, dtype=torch.long, device=torch_device).tril()

    def prepare_config_and_inputs_for_common(self):
        inputs = {"input_ids": self.prepare_input_ids()}
        mask = self.prepare_attention_mask()
        if mask is not None:
            inputs["attention_mask"] = mask
        return self.get_config(), inputs


class StandInFamilyTests(ModelTesterMixin):
    """ModelTesterMixin plus the tests a family file adds: each ConfigTester check on its own (upstream's family
    files run them all as one `test_config`), and the model tester's shape and cache checks."""

    model_tester_class: type[StandInModelTester]
    config_tester_kwargs: dict = {}
    test_pruning = False  # as in upstream's family files: transformers' models of the three families prune no heads

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
        self.all_model_classes = self.model_tester.all_model_classes
        self.config_tester = ConfigTester(self, config_class=self.model_tester.config_class,
                                          **self.config_tester_kwargs)  # fmt: skip

    def test_config_common_properties(self):
        self.config_tester.create_and_test_config_common_properties()

    def test_config_to_json_string(self):
        self.config_tester.create_and_test_config_to_json_string()

    def test_config_to_json_file(self):
        self.config_tester.create_and_test_config_to_json_file()

    def test_config_from_and_save_pretrained(self):
        self.config_tester.create_and_test_config_from_and_save_pretrained()

    def test_config_from_and_save_pretrained_subfolder(self):
        self.config_tester.create_and_test_config_from_and_save_pretrained_subfolder()

    def test_config_from_and_save_pretrained_composite(self):
        self.config_tester.create_and_test_config_from_and_save_pretrained_composite()

    def test_config_with_num_labels(self):
        self.config_tester.create_and_test_config_with_num_labels()

    def test_config_can_be_init_without_params(self):
        self.config_tester.check_config_can_be_init_without_params()

    def test_config_arguments_init(self):
        self.config_tester.check_config_arguments_init()

    def test_config_from_pretrained_custom_kwargs(self):
        self.config_tester.create_and_test_config_from_pretrained_custom_kwargs()

    def _tester_inputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        return config, inputs["input_ids"].to(torch_device), inputs.get("attention_mask")

    def test_model(self):
        config, input_ids, mask = self._tester_inputs()
        model = self.model_tester.base_model_class(config).to(torch_device).eval()
        tester = self.model_tester
        for result in (model(input_ids, attention_mask=mask), model(input_ids)):
            self.assertEqual(result.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))

    def test_causal_lm(self):
        config, input_ids, mask = self._tester_inputs()
        model = self.model_tester.causal_lm_class(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=mask, labels=input_ids)
        tester = self.model_tester
        self.assertEqual(result.loss.shape, ())
        self.assertEqual(result.logits.shape, (tester.batch_size, tester.seq_length, tester.vocab_size))

    def test_model_past(self):
        """Decoding one more token on the cache gives the hidden state the whole sequence gives at that position."""
        config, input_ids, _ = self._tester_inputs()
        model = self.model_tester.base_model_class(config).to(torch_device).eval()
        past = model(input_ids, use_cache=True).past_key_values
        next_tokens = ids_tensor((self.model_tester.batch_size, 1), config.vocab_size)
        whole = model(torch.cat([input_ids, next_tokens], dim=-1)).last_hidden_state[:, -1]
        step = model(next_tokens, past_key_values=past).last_hidden_state[:, 0]
        torch.testing.assert_close(step, whole, atol=1e-4, rtol=1e-4)


class StandInClassificationTests:
    """The classification heads' shape checks, for the families that have them (GLM, Persimmon)."""

    def test_sequence_classification_model(self):
        tester = self.model_tester
        config, input_ids, mask = self._tester_inputs()
        config.num_labels = tester.num_labels
        model = tester.sequence_classification_class(config).to(torch_device).eval()
        labels = ids_tensor([tester.batch_size], tester.num_labels)
        result = model(input_ids, attention_mask=mask, labels=labels)
        self.assertEqual(result.logits.shape, (tester.batch_size, tester.num_labels))
        self.assertEqual(result.loss.shape, ())

    def test_token_classification_model(self):
        tester = self.model_tester
        config, input_ids, mask = self._tester_inputs()
        config.num_labels = tester.num_labels
        model = tester.token_classification_class(config).to(torch_device).eval()
        labels = ids_tensor([tester.batch_size, tester.seq_length], tester.num_labels)
        result = model(input_ids, attention_mask=mask, labels=labels)
        self.assertEqual(result.logits.shape, (tester.batch_size, tester.seq_length, tester.num_labels))
        self.assertEqual(result.loss.shape, ())
