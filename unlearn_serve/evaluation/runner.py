"""TOFU evaluation driven by the serving engine.

Every number comes from `Engine.generate` (greedy answers) or from prompt log-probabilities the
engine computes through the same per-request unlearning selection the server uses (ULD assistant
with its alpha, UOE expert patch, or none). There is no second generation code path here; the
arithmetic lives in training/metrics.py.

Splits (TOFU file names): forget (forgetXX_perturbed.json), retain (retain_perturbed.json),
real_authors (real_authors_perturbed.json), world_facts (world_facts_perturbed.json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from unlearn_serve.evaluation import metrics as M
from unlearn_serve.evaluation.attacks import AttackConfig, run_attacks
from unlearn_serve.training.data import (
    DEFAULT_QUESTION_TEMPLATE,
    DataError,
    encode_prompt,
    load_records,
    render_example,
)
from unlearn_serve.uld_combine import CombineOptions

SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
MAX_NEW_TOKENS = 200  # TOFU / open-unlearning generation length for ROUGE


# ----------------------------------------------------------------------------- data


def tofu_files(directory: str | Path, forget_split: str = "forget10") -> dict[str, Path]:
    """The perturbed eval files of a TOFU directory (those present)."""
    d = Path(directory)
    names = {
        "forget": f"{forget_split}_perturbed.json",
        "retain": "retain_perturbed.json",
        "real_authors": "real_authors_perturbed.json",
        "world_facts": "world_facts_perturbed.json",
    }
    found = {split: d / name for split, name in names.items() if (d / name).is_file()}
    if "forget" not in found:
        raise DataError(f"{d}: no {names['forget']} (pass a TOFU directory or SPLIT=FILE entries)")
    return found


def resolve_data(entries: list[str], forget_split: str = "forget10") -> dict[str, Path]:
    """`--data` values: one TOFU directory, or SPLIT=FILE entries (split in forget, retain, real_authors,
    world_facts), or files whose names start with the split (forget10_perturbed.json, ...)."""
    if len(entries) == 1 and Path(entries[0]).is_dir():
        return tofu_files(entries[0], forget_split)
    files: dict[str, Path] = {}
    for entry in entries:
        if "=" in entry:
            split, _, path = entry.partition("=")
        else:
            path = entry
            stem = Path(entry).name
            split = next((s for s in SPLITS if stem.startswith(s)), "")
        if split not in SPLITS:
            raise DataError(
                f"--data {entry}: cannot tell the split; write SPLIT=FILE with SPLIT one of {', '.join(SPLITS)}"
            )
        if not Path(path).is_file():
            raise DataError(f"--data {entry}: {path}: no such file")
        files[split] = Path(path)
    if "forget" not in files:
        raise DataError("--data: a forget split is required (forget=FILE or a TOFU directory)")
    return files


def load_eval_data(files: dict[str, Path], limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    data: dict[str, list[dict[str, Any]]] = {}
    for split, path in files.items():
        records = load_records(path)
        for i, r in enumerate(records):
            if "question" not in r or "answer" not in r:
                raise DataError(f"{path}: record {i + 1}: evaluation needs question/answer records")
        data[split] = records[:limit] if limit else records
    return data


# ----------------------------------------------------------------------------- methods


# serving settings an evaluation may score instead of the manifest's: the combination options
ULD_EVAL_OPTIONS = tuple(f.name for f in fields(CombineOptions))


def parse_uld_options(texts: list[str]) -> list[dict[str, Any]]:
    """`KEY=VALUE[,KEY=VALUE]` strings as option dicts for `Method.options` (values are checked by the engine when
    the rows are resolved). ValueError names the bad string."""
    sets = []
    for text in texts:
        options: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition("=")
            if not sep or key not in ULD_EVAL_OPTIONS or not value:
                raise ValueError(
                    f"{text!r}: write KEY=VALUE pairs separated by commas, KEY one of {', '.join(ULD_EVAL_OPTIONS)}"
                )
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value  # a rule name
        sets.append(options)
    return sets


def options_label(options: dict[str, Any]) -> str:
    """How an option set is named in report rows: `margin=2 floor=10`."""
    return " ".join(f"{k}={v}" for k, v in options.items())


@dataclass
class Method:
    """One thing to evaluate: the engine's model with an unlearning selection (or none)."""

    label: str
    kind: str  # "base", "uld", "uoe", "model" (a separately trained model, e.g. a baseline)
    artifact: str | None = None
    alpha: float | None = None  # ULD only; None = the artifact's default
    # ULD only: engine-level settings scored instead of the manifest's (margin, floor, rule, refilter)
    options: dict[str, Any] = field(default_factory=dict)

    def selection(self, scoring: bool):
        from unlearn_serve.server.engine.sequence import Selection

        if self.artifact is None:
            return None
        options: dict[str, Any] = dict(self.options)
        if self.alpha is not None:
            options["alpha"] = self.alpha
        if scoring and self.kind == "uld":
            # The relative-top filter gives implausible tokens -inf, which makes the log-probability
            # of a whole reference answer -inf; scoring looks at the full ULD distribution instead.
            options["filter"] = 0.0
        return Selection(self.artifact, options)


@dataclass
class EvalConfig:
    max_new_tokens: int = MAX_NEW_TOKENS
    question_template: str = DEFAULT_QUESTION_TEMPLATE
    progress: bool = True
    attacks: AttackConfig | None = field(default_factory=AttackConfig)  # None: no attack block


@dataclass
class _Item:
    context: list[int]
    continuation: list[int]


def _split_qa(engine, question: str, answer: str, template: str) -> _Item:
    prompt = encode_prompt(engine.tokenizer, question, template)
    full, _ = render_example(engine.tokenizer, {"question": question, "answer": answer}, 10**9, template)
    if full[: len(prompt)] != prompt or len(full) <= len(prompt):
        raise DataError(f"cannot locate the answer tokens of {question[:60]!r} after the prompt")
    room = engine.max_model_len - 1 - len(prompt)  # the engine refuses a prompt of max_model_len tokens
    return _Item(prompt, full[len(prompt) : len(prompt) + max(room, 0)])


def _score(
    engine, items: list[_Item], selection, progress: bool = False
) -> tuple[list[list[float]], list[list[int]]]:
    """(log-prob of each continuation token, argmax token at each position) through the engine."""
    from unlearn_serve.server.engine.sampling_params import SamplingParams

    if not items:
        return [], []
    params = SamplingParams(max_tokens=0, prompt_logprobs=1, temperature=0.0)
    prompts = [it.context + it.continuation for it in items]
    results = engine.generate(prompts, params, selection, use_tqdm=progress)
    logprobs, argmax = [], []
    for it, r in zip(items, results, strict=True):
        entries = r.prompt_logprobs[len(it.context) :]
        logprobs.append([e.logprob for e in entries])
        argmax.append([e.top[0][0] if e.top else e.token_id for e in entries])
    return logprobs, argmax


def _generate(engine, prompts: list[list[int]], selection, max_new_tokens: int, progress: bool):
    from unlearn_serve.server.engine.sampling_params import SamplingParams

    params = [
        SamplingParams(max_tokens=max(1, min(max_new_tokens, engine.max_model_len - len(p))), temperature=0.0)
        for p in prompts
    ]
    results = engine.generate(prompts, params, selection, use_tqdm=progress)
    return [r.completions[0].text.strip() for r in results], [r.completions[0].token_ids for r in results]


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: list[float]) -> float | None:
    vals = _finite(values)
    return float(np.mean(vals)) if vals else None


def evaluate_split(engine, method: Method, split: str, records: list[dict[str, Any]], config: EvalConfig) -> dict:
    """All metrics of one split for one method: summary values and per-question arrays."""
    template = config.question_template
    qa = [_split_qa(engine, r["question"], r["answer"], template) for r in records]
    sel_score = method.selection(scoring=True)

    # Answers scored once: probability, exact memorisation, extraction strength.
    answer_lp, answer_argmax = _score(engine, qa, sel_score, config.progress)
    prob = [M.probability(lp) if lp else float("nan") for lp in answer_lp]
    em = [M.exact_memorization(a, it.continuation) if it.continuation else float("nan")
          for a, it in zip(answer_argmax, qa, strict=True)]
    es = [M.extraction_strength(a, it.continuation) for a, it in zip(answer_argmax, qa, strict=True)]

    # Truth ratio: paraphrased answer (forget/retain) or the answer itself (real authors/world facts)
    # against the perturbed answers (open-unlearning's TOFU configs).
    tr: list[float] = []
    option_prob: list[float] = []
    has_perturbed = all(isinstance(r.get("perturbed_answer"), list) and r["perturbed_answer"] for r in records)
    if has_perturbed:
        correct_items, wrong_items, owners = [], [], []
        for i, r in enumerate(records):
            correct = r.get("paraphrased_answer") if split in ("forget", "retain") else None
            correct_items.append(_split_qa(engine, r["question"], correct or r["answer"], template))
            for wrong in r["perturbed_answer"]:
                wrong_items.append(_split_qa(engine, r["question"], wrong, template))
                owners.append(i)
        correct_lp, _ = _score(engine, correct_items, sel_score, config.progress)
        wrong_lp, _ = _score(engine, wrong_items, sel_score, config.progress)
        grouped: list[list[list[float]]] = [[] for _ in records]
        for i, lp in zip(owners, wrong_lp, strict=True):
            grouped[i].append(lp)
        tr = [M.truth_ratio(c, w) for c, w in zip(correct_lp, grouped, strict=True)]
        if split in ("real_authors", "world_facts"):
            option_prob = [M.normalised_option_probability(a, w) for a, w in zip(answer_lp, grouped, strict=True)]

    # Greedy answers for ROUGE-L recall.
    texts, gen_ids = _generate(
        engine, [it.context for it in qa], method.selection(scoring=False), config.max_new_tokens, config.progress
    )
    rouge = [M.rouge_l_recall(t, r["answer"]) for t, r in zip(texts, records, strict=True)]

    summary: dict[str, Any] = {
        "probability": _mean(prob),
        "rouge": _mean(rouge),
        "exact_memorization": _mean(em),
        "extraction_strength": _mean(es),
    }
    if tr:
        summary["truth_ratio"] = M.truth_ratio_forget(tr) if split == "forget" else M.truth_ratio_utility(tr)
    if option_prob:
        summary["probability_normalised"] = _mean(option_prob)
    per_question: dict[str, Any] = {
        "probability": prob,
        "rouge": rouge,
        "exact_memorization": em,
        "extraction_strength": es,
        "truth_ratio": tr,
        "generated": texts,
    }
    if option_prob:
        per_question["probability_normalised"] = option_prob
    return {"summary": summary, "per_question": per_question, "_gen_ids": gen_ids, "_contexts": [q.context for q in qa]}


def evaluate_method(
    engine,
    method: Method,
    data: dict[str, list[dict[str, Any]]],
    config: EvalConfig,
    fluency_engine=None,
) -> dict[str, Any]:
    """Every split for one method, plus fluency of its forget answers under `fluency_engine` (the base
    model; default: this engine with no unlearning)."""
    splits: dict[str, Any] = {}
    for split in SPLITS:
        if split in data:
            if config.progress:
                print(f"[eval] {method.label}: {split} ({len(data[split])} questions)", flush=True)
            splits[split] = evaluate_split(engine, method, split, data[split], config)

    forget = splits["forget"]
    # Fluency (beyond the references): the base model's perplexity of the forget answers this
    # method generated, and the share of those answers stuck in an n-gram loop.
    judge = fluency_engine or engine
    items = [_Item(c, g) for c, g in zip(forget.pop("_contexts"), forget.pop("_gen_ids"), strict=True) if g]
    lp, _ = _score(judge, items, None, config.progress)
    per_answer_ppl = [M.perplexity([x]) for x in lp]
    texts = forget["per_question"]["generated"]
    loops = [M.has_ngram_loop(t) for t in texts]
    forget["per_question"]["fluency_perplexity"] = per_answer_ppl
    forget["per_question"]["ngram_loop"] = loops
    for s in splits.values():
        s.pop("_gen_ids", None)
        s.pop("_contexts", None)

    summary = {
        "forget_probability": forget["summary"]["probability"],
        "forget_rouge": forget["summary"]["rouge"],
        "forget_truth_ratio": forget["summary"].get("truth_ratio"),
        "forget_extraction_strength": forget["summary"]["extraction_strength"],
        "forget_exact_memorization": forget["summary"]["exact_memorization"],
        "retain_rouge": splits["retain"]["summary"]["rouge"] if "retain" in splits else None,
        "retain_probability": splits["retain"]["summary"]["probability"] if "retain" in splits else None,
        "fluency_perplexity": M.perplexity(lp) if lp else None,
        "ngram_loop_share": M.loop_share(texts),
        "model_utility": None,
        "model_utility_parts": None,
        "forget_quality": None,
    }
    parts = utility_parts(splits)
    if parts is not None:
        summary["model_utility_parts"] = parts
        summary["model_utility"] = M.model_utility(parts)
    result = {
        "label": method.label,
        "kind": method.kind,
        "artifact": method.artifact,
        "alpha": method.alpha,
        "summary": summary,
        "splits": splits,
    }
    if config.attacks is not None and config.attacks.attacks is not None:
        attack_config = config.attacks
        if attack_config.max_new_tokens > config.max_new_tokens:
            attack_config = replace(attack_config, max_new_tokens=config.max_new_tokens)
        attacks = run_attacks(engine, method, data["forget"], attack_config, config.question_template,
                              config.progress)
        summary.update(attacks["summary"])
        result["attacks"] = attacks
    return result


def utility_parts(splits: dict[str, Any]) -> dict[str, float] | None:
    """The nine numbers TOFU's model utility is the harmonic mean of (None when a split is missing)."""
    parts: dict[str, float] = {}
    for split in UTILITY_SPLITS:
        if split not in splits:
            return None
        s = splits[split]["summary"]
        prob = s["probability"] if split == "retain" else s.get("probability_normalised")
        values = {"probability": prob, "rouge": s["rouge"], "truth_ratio": s.get("truth_ratio")}
        for name, value in values.items():
            if value is None or not math.isfinite(value):
                return None
            parts[f"{split}_{name}"] = float(value)
    return parts


def forget_truth_ratios(result: dict[str, Any]) -> list[float]:
    return _finite(result["splits"]["forget"]["per_question"]["truth_ratio"])


def add_forget_quality(results: list[dict[str, Any]], reference: list[float] | None) -> None:
    for result in results:
        ratios = forget_truth_ratios(result)
        if reference and ratios:
            result["summary"]["forget_quality"] = M.forget_quality(ratios, reference)


# ----------------------------------------------------------------------------- reference logs


def load_reference(path: str | Path) -> list[float]:
    """Per-question forget truth ratios of a retain-only model, from:
    a metrics.json this module wrote (its `reference_forget_truth_ratios`), a plain JSON list, or
    open-unlearning's eval logs ({"forget_truth_ratio": {"value_by_index": {i: {"score": v}}}})."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"--retain-reference {p}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"--retain-reference {p}: not a JSON file ({exc})") from None
    values: Any = None
    if isinstance(data, list):
        values = data
    elif isinstance(data, dict):
        if "reference_forget_truth_ratios" in data:
            values = data["reference_forget_truth_ratios"]
        elif isinstance(data.get("forget_truth_ratio"), dict) and "value_by_index" in data["forget_truth_ratio"]:
            by_index = data["forget_truth_ratio"]["value_by_index"]
            values = [v.get("score") for v in by_index.values() if isinstance(v, dict)]
    if not isinstance(values, list) or not values or not all(isinstance(v, int | float) for v in values):
        raise DataError(
            f"--retain-reference {p}: no per-question forget truth ratios found; pass the metrics.json that "
            "`unlearn-serve eval` wrote for the retain-only model"
        )
    return [float(v) for v in values]


def evaluate(
    engine,
    methods: list[Method],
    data: dict[str, list[dict[str, Any]]],
    config: EvalConfig,
    reference: list[float] | None = None,
    extra: list[tuple[Method, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate `methods` on `engine` and `extra` (method, other engine) pairs; returns the metrics.json dict.

    The first method should be the base model: its per-question forget truth ratios are saved as
    `reference_forget_truth_ratios`, so the file of a retain-only model is a valid --retain-reference.
    """
    results = [evaluate_method(engine, m, data, config) for m in methods]
    for method, other in extra or []:
        results.append(evaluate_method(other, method, data, config, fluency_engine=engine))
    add_forget_quality(results, reference)
    base = next((r for r in results if r["kind"] == "base"), None)
    return {
        "model": engine.model_name,
        "splits": {k: len(v) for k, v in data.items()},
        "config": {"max_new_tokens": config.max_new_tokens, "question_template": config.question_template},
        "retain_reference": {"questions": len(reference)} if reference else None,
        "reference_forget_truth_ratios": forget_truth_ratios(base) if base else None,
        "methods": results,
    }


def jsonable(value: Any) -> Any:
    """NaN / inf become null so metrics.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value


@dataclass
class Written:
    metrics: Path
    report: Path
    plots: list[Path] = field(default_factory=list)


def write_outputs(out_dir: str | Path, metrics: dict[str, Any], title: str = "unlearn-serve evaluation") -> Written:
    from unlearn_serve.evaluation.report import plot_alpha_sweep, plot_attacks, plot_fq_vs_mu, render_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    tmp = metrics_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(metrics), indent=1))
    tmp.replace(metrics_path)
    plots = [plot_fq_vs_mu(metrics, out / "fq_vs_mu.png")]
    alpha_plot = plot_alpha_sweep(metrics, out / "uld_alpha.png")
    if alpha_plot is not None:
        plots.append(alpha_plot)
    attack_plot = plot_attacks(metrics, out / "attacks.png")
    if attack_plot is not None:
        plots.append(attack_plot)
    report = out / "report.md"
    report.write_text(render_report(metrics, [p.name for p in plots], title))
    return Written(metrics_path, report, plots)
