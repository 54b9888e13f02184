"""A real uvicorn server on 127.0.0.1 (a free port), in a thread, around an app from create_app."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import glmkit  # noqa: E402
from glmkit.serve.app import create_app  # noqa: E402

from .fake import FakeScheduler  # noqa: E402

UVICORN_SERVER = uvicorn.Server  # bound now: CLI tests replace uvicorn.Server with a fake
MODEL = "glmkit-test"
KEY = "sk-test-key"
MAX_MODEL_LEN = 256


def wait_for(condition, what: str, deadline: float = 60.0) -> None:
    """Poll until `condition()` holds (a liveness wait, not a timing assertion: the deadline is generous)."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` on a free port until the block ends; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    server = UVICORN_SERVER(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "the server to start")
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not shut down"


@pytest.fixture(scope="session")
def tokenizer():
    return glmkit.AutoTokenizer.from_pretrained("default:glm")


@pytest.fixture
def fake(tokenizer) -> Iterator[FakeScheduler]:
    scheduler = FakeScheduler(tokenizer, max_queue_len=8)
    scheduler.start()
    yield scheduler
    scheduler.release()
    scheduler.stop()


@pytest.fixture
def fake_url(fake, tokenizer) -> Iterator[str]:
    with running(create_app(fake, tokenizer, MODEL, max_model_len=MAX_MODEL_LEN)) as url:
        yield url


@pytest.fixture
def keyed_url(fake, tokenizer) -> Iterator[str]:
    with running(create_app(fake, tokenizer, MODEL, api_key=KEY, max_model_len=MAX_MODEL_LEN)) as url:
        yield url
