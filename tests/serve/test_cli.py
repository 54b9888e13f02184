"""`glmkit serve`: arguments, the missing-extra message, and the wiring of model, scheduler and app."""

from __future__ import annotations

import sys

import pytest

from glmkit import cli

from .conftest import running
from .fake import FakeScheduler

openai = pytest.importorskip("openai")


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["serve", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--served-model-name", "--max-num-seqs", "--max-queue-len",
                 "--max-model-len", "--api-key", "--dtype"):  # fmt: skip
        assert flag in out


def test_missing_extra_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` raises ImportError
    assert cli.main(["serve"]) == 1
    assert "pip install 'glmkit[serve]'" in capsys.readouterr().err


def test_serve_loads_the_model_and_serves_it(monkeypatch, tokenizer):
    import uvicorn

    made: dict = {}

    def scheduler(model, tok, **kwargs):
        made.update(model=model, kwargs=kwargs, engine=FakeScheduler(tok))
        return made["engine"]

    def run(app, host, port, **kwargs):  # instead of serving forever: serve while one client makes its calls
        made.update(host=host, port=port)
        assert made["engine"]._thread is not None, "the scheduler starts before the server"
        with running(app) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0) as client:
            made["models"] = [m.id for m in client.models.list().data]
            made["reply"] = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()

    monkeypatch.setattr("glmkit.serve.scheduler.Scheduler", scheduler)
    monkeypatch.setattr(uvicorn, "run", run)
    argv = ["serve", "--served-model-name", "tiny", "--api-key", "k3y", "--port", "8123", "--host", "0.0.0.0",
            "--max-num-seqs", "4", "--max-queue-len", "9", "--max-model-len", "300"]  # fmt: skip
    assert cli.main(argv) == 0
    assert made["model"].config.model_type == "glm" and (made["host"], made["port"]) == ("0.0.0.0", 8123)
    assert made["kwargs"] == {"max_num_seqs": 4, "max_queue_len": 9, "max_model_len": 300}
    assert made["models"] == ["tiny"] and made["reply"].usage.completion_tokens == 3
    assert made["engine"]._stopping, "the scheduler stops with the server"


def test_max_model_len_past_the_model_is_an_error(capsys):
    assert cli.main(["serve", "--max-model-len", "100000"]) == 1
    assert "max-model-len" in capsys.readouterr().err
