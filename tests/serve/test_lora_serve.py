"""LoRA adapters served by model name: requests for the base model and for two adapters share one running
batch, and each request's greedy tokens equal `generate` on a model holding only its own adapter."""

from __future__ import annotations

import threading

import pytest
import torch

import glmkit
from glmkit import lora
from glmkit.serve.app import create_app
from glmkit.serve.scheduler import Request, RequestError, SamplingParams, Scheduler

from .conftest import running

openai = pytest.importorskip("openai")

BASE = "default:glm"
PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo", "First Citizen:\nBefore we proceed", "KING", "To be, or not"]


def _adapter(directory, targets, rank: int, seed: int):
    """A random adapter (non-zero B, so it changes the output) saved in the PEFT format."""
    model = glmkit.AutoModelForCausalLM.from_pretrained(BASE)
    torch.manual_seed(seed)
    lora.apply(model, rank=rank, alpha=2 * rank, target_modules=targets)
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.3)
    lora.save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"shylock": _adapter(root / "a", "all", 4, 0), "portia": _adapter(root / "b", ["q_proj", "down_proj"], 8, 1)}


@pytest.fixture(scope="module")
def served(adapters):
    model = glmkit.AutoModelForCausalLM.from_pretrained(BASE)
    ids = lora.load_adapters(model, adapters)
    return model, ids


def _alone(directory, ids: list[int], n: int) -> list[int]:
    model = glmkit.AutoModelForCausalLM.from_pretrained(BASE, adapter=directory)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(ids) :].tolist()


def test_mixed_batch_equals_each_adapter_alone(served, adapters, tokenizer):
    model, ids = served
    names = [None, "shylock", "portia", "shylock", "portia", None]
    requests = [(tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids, names[i], 6 + 3 * i) for i in range(len(names))]
    got: dict[str, list[int]] = {}
    left, done = [len(requests)], threading.Event()

    def collect(event) -> None:
        got.setdefault(event.request_id, []).extend(event.token_ids)
        if event.finish_reason is not None:
            left[0] -= 1
            if not left[0]:
                done.set()

    scheduler = Scheduler(model, tokenizer, max_num_seqs=4, prefill_chunk=8)
    scheduler.start()
    try:
        for i, (prompt, name, n) in enumerate(requests):
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            scheduler.submit(Request(prompt, params, collect, request_id=str(i), adapter=ids.get(name, 0)))
        assert done.wait(120)
        with pytest.raises(RequestError, match="no LoRA adapter 3"):
            scheduler.submit(Request(requests[0][0], SamplingParams(max_tokens=2), collect, adapter=3))
    finally:
        scheduler.stop()
    base_model = glmkit.AutoModelForCausalLM.from_pretrained(BASE)
    for i, (prompt, name, n) in enumerate(requests):
        if name is None:
            want = base_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
            want = want[0, len(prompt) :].tolist()
        else:
            want = _alone(adapters[name], prompt, n)
        assert got[str(i)] == want, f"request {i} ({name or 'base'})"
    assert got["1"] != got["0"][: len(got["1"])] or got["2"] != got["0"][: len(got["2"])]  # adapters matter


def test_served_by_model_name(served, adapters, tokenizer):
    model, ids = served
    scheduler = Scheduler(model, tokenizer, max_num_seqs=4)
    scheduler.start()
    try:
        app = create_app(scheduler, tokenizer, "base", max_model_len=512, adapters=ids)
        with running(app) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            cards = {m.id: m for m in client.models.list().data}
            assert set(cards) == {"base", "shylock", "portia"}
            prompt = tokenizer(PROMPTS[1]).input_ids
            out = client.completions.create(model="portia", prompt=prompt, max_tokens=5, temperature=0.0)
            assert out.model == "portia"
            assert out.choices[0].text == tokenizer.decode(_alone(adapters["portia"], prompt, 5)[:5],
                                                           skip_special_tokens=True)  # fmt: skip
            with pytest.raises(openai.NotFoundError, match="`nerissa` does not exist"):
                client.completions.create(model="nerissa", prompt="x", max_tokens=2)
    finally:
        scheduler.stop()


FLAG_ERRORS = [
    (["--lora", "bad"], "wants NAME=DIR"),
    (["--lora", "a=/x", "--lora", "a=/y"], "given twice"),
    (["--served-model-name", "m", "--lora", "m=/x"], "base model's served name"),
]


@pytest.mark.parametrize(("flags", "match"), FLAG_ERRORS)
def test_lora_flag_errors(capsys, flags, match):
    from glmkit import cli

    assert cli.main(["serve", *flags]) == 1
    assert match in capsys.readouterr().err
