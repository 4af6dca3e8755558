"""The demo's fast pieces (the full demo trains on SmolLM2 for minutes, too slow for CI): its CLI,
the bundled data, the cache key and the curl lines."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from unlearn_serve.training.data import load_records, record_kind

from unlearn_serve.cli import demo


def test_demo_help_lists_its_options():
    out = subprocess.run(
        [sys.executable, "-m", "unlearn_serve.cli", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for flag in ("--topic", "--port", "--cache-dir", "--retrain", "--train-only"):
        assert flag in out.stdout


@pytest.mark.parametrize("topic", sorted(demo.TOPICS))
def test_bundled_data_parses_and_is_sized_for_the_demo(topic):
    forget_name, retain_name = demo.TOPICS[topic]
    forget = load_records(demo.data_file(forget_name))
    retain = load_records(demo.data_file(retain_name))
    assert 40 <= len(forget) <= 80 and len(retain) >= 40
    assert all(record_kind(r) == "qa" for r in forget + retain)
    questions = [r["question"] for r in forget + retain]
    assert len(set(questions)) == len(questions)  # no question both forgotten and retained, no duplicates
    assert any(r["question"] == demo.DEMO_QUESTION[topic] for r in forget)


def test_cache_key_changes_with_base_data_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    forget.write_text('{"question": "q", "answer": "a"}\n')
    retain.write_text('{"question": "q2", "answer": "a2"}\n')
    base = {"model_type": "llama", "weights_hash": "abc"}
    training = demo.DemoTraining()
    key = demo.cache_key(base, [forget, retain], training)
    assert key == demo.cache_key(dict(base), [forget, retain], demo.DemoTraining())  # deterministic
    assert key != demo.cache_key({**base, "weights_hash": "abd"}, [forget, retain], training)
    assert key != demo.cache_key(base, [forget, retain], replace(training, epochs=training.epochs + 1))
    # every trainer setting counts, also the train-uld defaults the demo does not name (no recipe bump needed)
    settings = demo.DemoTraining.uld_settings
    monkeypatch.setattr(demo.DemoTraining, "uld_settings", lambda self: {**settings(self), "retain_candidates": 3})
    assert key != demo.cache_key(base, [forget, retain], training)
    monkeypatch.undo()
    # the margins the calibration chooses from: set in the settings or by the library default, a new key
    margins = {"calibration_margins": [1, 2]}
    monkeypatch.setattr(demo.DemoTraining, "uld_settings", lambda self: {**settings(self), **margins})
    assert key != demo.cache_key(base, [forget, retain], training)
    monkeypatch.undo()
    from unlearn_serve import uld_combine

    monkeypatch.setattr(uld_combine, "CALIBRATION_MARGINS", (uld_combine.DEFAULT_MARGIN, 2.0))
    assert key != demo.cache_key(base, [forget, retain], training)
    monkeypatch.undo()
    # the prefix guard the calibration serves with: the library default or --no-prefix-guard, a new key each
    monkeypatch.setattr(uld_combine, "DEFAULT_PREFIX_GUARD", not uld_combine.DEFAULT_PREFIX_GUARD)
    assert key != demo.cache_key(base, [forget, retain], training)
    monkeypatch.undo()
    monkeypatch.setattr(uld_combine, "DEFAULT_FINISH_WORDS", not uld_combine.DEFAULT_FINISH_WORDS)  # finishing words
    assert key != demo.cache_key(base, [forget, retain], training)
    monkeypatch.undo()
    guard_off = {"default_prefix_guard": False}
    monkeypatch.setattr(demo.DemoTraining, "uld_settings", lambda self: {**settings(self), **guard_off})
    assert key != demo.cache_key(base, [forget, retain], training)
    monkeypatch.undo()
    finish_off = {"default_finish_words": not uld_combine.DEFAULT_FINISH_WORDS}
    monkeypatch.setattr(demo.DemoTraining, "uld_settings", lambda self: {**settings(self), **finish_off})
    assert key != demo.cache_key(base, [forget, retain], training)
    monkeypatch.undo()
    retain.write_text('{"question": "q2", "answer": "changed"}\n')
    assert key != demo.cache_key(base, [forget, retain], training)
    d = demo.cached_artifact_dir(tmp_path, "harry-potter", key)
    assert d.name == f"smollm2-forget-harry-potter-{key}" and not demo.is_complete_artifact(d)
    d.mkdir(parents=True)
    (d / "unlearning.json").write_text("{not json")
    assert not demo.is_complete_artifact(d)  # a half-written or corrupt directory is retrained, not served


def test_curl_lines_ask_the_same_question_of_both_models():
    lines = demo.curl_lines("0.0.0.0", 8123, "harry-potter", api_key="k1")
    assert len(lines) == 2
    bodies = []
    for line in lines:
        argv = shlex.split(line)
        assert argv[:3] == ["curl", "-s", "http://127.0.0.1:8123/v1/chat/completions"]
        assert "Authorization: Bearer k1" in argv
        bodies.append(json.loads(argv[argv.index("-d") + 1]))
    assert [b["model"] for b in bodies] == ["smollm2", "smollm2-forget-harry-potter"]
    assert bodies[0]["messages"] == bodies[1]["messages"]
    assert bodies[0]["messages"][0]["content"] == demo.DEMO_QUESTION["harry-potter"]
