"""The serving side of `train-uld`'s calibration: answer validation questions through the serving Engine.

`serve_with_engine` is the `serve` function `train_uld` takes (training/uld_calibrate.py): an Engine on
the base model with the draft artifact loaded, greedy answers with `unlearning` chosen per prompt
(`{"alpha": a}`, `{"margin": m}` when the calibration chooses the margin, and `options` such as `{"finish_words":
false}` when it compares them, override the draft's defaults), all
prompts of a call decoded as one batch. Its `nll`
scores answer text under the base model (unlearn_serve/evaluation/fluency.py, the harness's definition),
for the relative-perplexity check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unlearn_serve.evaluation.fluency import answers_nll
from unlearn_serve.server.engine.engine import Engine, EngineConfig
from unlearn_serve.server.engine.sampling_params import SamplingParams
from unlearn_serve.server.engine.sequence import Selection
from unlearn_serve.training.uld_calibrate import AnswerFn

ARTIFACT_NAME = "validation"


def serve_with_engine(model: Any, tokenizer: Any, artifact: Path, max_num_seqs: int = 64) -> AnswerFn:
    """An answer function backed by a serving Engine that holds `artifact` (see module docstring)."""
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=512), "base")
    engine.load_uld(ARTIFACT_NAME, artifact)

    def answer(
        prompts: list[list[int]],
        alphas: list[float | None],
        max_tokens: int,
        margin: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> list[str]:
        if not prompts:
            return []
        served = dict(options or {}) | ({} if margin is None else {"margin": margin})
        selections = [None if a is None else Selection(ARTIFACT_NAME, {"alpha": a, **served}) for a in alphas]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        return [r.completions[0].text for r in engine.generate(prompts, params, selections)]

    answer.nll = lambda texts: answers_nll(engine, tokenizer, texts)  # type: ignore[attr-defined]
    return answer
