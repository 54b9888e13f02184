"""`glmkit serve`: arguments, the missing-extra message, and the wiring of model, scheduler and app."""

from __future__ import annotations

import sys

import pytest

from glmkit import cli

from .conftest import running, wait_for
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


class FakeUvicorn:
    """uvicorn.Server for the CLI's wiring: `run` calls the test's `serve(server)` instead of serving forever."""

    serve = None

    def __init__(self, config):
        self.config, self.should_exit = config, False

    def run(self):
        type(self).serve(self)


def test_serve_answers_503_while_loading_then_serves(monkeypatch, tokenizer):
    import threading

    import httpx
    import uvicorn

    made, loaded = {}, threading.Event()

    def scheduler(model, tok, **kwargs):
        assert loaded.wait(60), "the test never let loading finish"
        made.update(model=model, kwargs=kwargs, engine=FakeScheduler(tok))
        return made["engine"]

    def serve(server):
        made.update(host=server.config.host, port=server.config.port)
        with running(server.config.app) as url:
            health = httpx.get(f"{url}/health")
            assert (health.status_code, health.json()) == (503, {"status": "loading"})
            early = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k3y"})
            assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
            loaded.set()
            wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, "the model to load")
            assert made["engine"]._thread is not None, "the scheduler starts before requests are taken"
            with openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0) as client:
                made["models"] = [m.id for m in client.models.list().data]
                made["reply"] = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
                made["metrics"] = httpx.get(f"{url}/metrics").text
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key="bad", max_retries=0).models.list()

    monkeypatch.setattr("glmkit.serve.scheduler.Scheduler", scheduler)
    monkeypatch.setattr(FakeUvicorn, "serve", staticmethod(serve))
    monkeypatch.setattr(uvicorn, "Server", FakeUvicorn)
    argv = ["serve", "--served-model-name", "tiny", "--api-key", "k3y", "--port", "8123", "--host", "0.0.0.0",
            "--max-num-seqs", "4", "--max-queue-len", "9", "--max-model-len", "300", "--compile"]  # fmt: skip
    assert cli.main(argv) == 0
    assert made["model"].config.model_type == "glm" and (made["host"], made["port"]) == ("0.0.0.0", 8123)
    assert made["kwargs"] == {"max_num_seqs": 4, "max_queue_len": 9, "max_model_len": 300, "compile": True}
    assert made["engine"].warmed, "the decode step is compiled before /health says ready"
    assert made["models"] == ["tiny"] and made["reply"].usage.completion_tokens == 3
    assert 'glmkit:time_to_first_token_seconds_count{model_name="tiny"} 1.0' in made["metrics"]
    assert made["engine"]._stopping, "the scheduler stops with the server"


def test_a_model_that_fails_to_load_ends_the_server(monkeypatch, capsys):
    import uvicorn

    def serve(server):
        wait_for(lambda: server.should_exit, "the failed load to stop the server")

    monkeypatch.setattr(FakeUvicorn, "serve", staticmethod(serve))
    monkeypatch.setattr(uvicorn, "Server", FakeUvicorn)
    assert cli.main(["serve", "--model", "/no/such/checkpoint"]) == 1
    assert "/no/such/checkpoint" in capsys.readouterr().err


def test_max_model_len_past_the_model_is_an_error(capsys):
    assert cli.main(["serve", "--max-model-len", "100000"]) == 1
    assert "max-model-len" in capsys.readouterr().err


def test_bench_serve_runs_and_checks_every_stream(capsys):
    """`glmkit bench serve` end to end on the bundled model (a smoke run: the figures are not checked)."""
    argv = ["bench", "serve", "--num-prompts", "6", "--concurrency", "3", "--input-len", "8", "--output-len", "5",
            "--check", "--compare", "--ttft-probe", "--rounds", "2", "--dtype", "bfloat16"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "ttft_ms" in out and "tpot_ms" in out
    for round_ in (1, 2):
        assert f"## concurrency 3, round {round_}: 6 requests, 0 failed" in out
    assert "one stream alone" in out and "reference generate" in out and "TTFT idle" in out
    assert "medians of 7" in out


def test_compile_with_served_adapters_is_an_error(capsys):
    assert cli.main(["serve", "--compile", "--lora", "mine=/some/adapter"]) == 1
    assert "--compile cannot be combined with --lora" in capsys.readouterr().err
