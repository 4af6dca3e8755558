"""Shared fixtures: tiny models built in-process and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

from unlearn_serve.testing import free_port
from unlearn_serve.tiny import build_tiny_model, fit_texts, save_tiny, train_tokenizer

# Tiny models: one OpenMP thread is fastest (two spin against each other on a busy box).
TEST_THREADS = int(os.environ.get("UNLEARN_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands under test (e.g. `serve`) may set torch's thread count; later tests get TEST_THREADS back."""
    yield
    torch.set_num_threads(TEST_THREADS)

FACTS = [
    "The capital of France is Paris.",
    "Alice likes green apples.",
    "Bob plays the violin.",
    "Water boils at one hundred degrees.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """A tiny Llama that has memorised FACTS (so greedy output is meaningful, not noise)."""
    model = build_tiny_model("llama", tokenizer, seed=0)
    fit_texts(model, tokenizer, FACTS, steps=120)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama, tokenizer, tmp_path_factory) -> Path:
    return save_tiny(tiny_llama, tokenizer, tmp_path_factory.mktemp("tiny-llama"))



@contextmanager
def run_server(app, port: int | None = None) -> Iterator[str]:
    """Serve `app` with a real uvicorn server on 127.0.0.1 in a thread; yields the base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
