"""report.md and PNG plots from an evaluation's metrics.json dict (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Every summary column once: metric key -> (header, format). Tables pick theirs by key.
COLUMN_SPECS: dict[str, tuple[str, str]] = {
    "forget_quality": ("FQ", "{:.3g}"),
    "model_utility": ("MU", "{:.3f}"),
    "forget_rouge": ("forget ROUGE", "{:.3f}"),
    "retain_rouge": ("retain ROUGE", "{:.3f}"),
    "forget_probability": ("forget prob", "{:.3f}"),
    "forget_truth_ratio": ("forget TR", "{:.3f}"),
    "forget_extraction_strength": ("forget ES", "{:.3f}"),
    "forget_exact_memorization": ("forget EM", "{:.3f}"),
    "fluency_perplexity": ("fluency PPL", "{:.3g}"),
    "ngram_loop_share": ("loops", "{:.2f}"),
    "training_time_s": ("time (s)", "{:.0f}"),
    "params_changed_share": ("params changed", "{:.2%}"),
    "attack_none_leak": ("leak", "{:.2f}"),
    "attack_max_leak": ("worst attack leak", "{:.2f}"),
}


def columns(*keys: str) -> list[tuple[str, str, str]]:
    """(key, header, format) for `summary_table`, in the order given."""
    return [(k, *COLUMN_SPECS[k]) for k in keys]


COLUMNS = columns(
    "forget_quality", "model_utility", "forget_rouge", "retain_rouge", "forget_probability", "forget_truth_ratio",
    "forget_extraction_strength", "forget_exact_memorization", "fluency_perplexity", "ngram_loop_share",
)


def fmt(value: Any, spec: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def summary_table(rows: list[tuple[str, dict[str, Any]]], columns=COLUMNS, extra: list[str] | None = None) -> str:
    """A Markdown table: one row per (label, summary dict)."""
    head = ["method"] + [c[1] for c in columns] + (extra or [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, summary in rows:
        cells = [label] + [fmt(summary.get(key), spec) for key, _, spec in columns]
        cells += [str(summary.get(e, "-")) for e in extra or []]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ATTACK_LABELS = [
    ("none", "no attack"),
    ("paraphrase", "paraphrase"),
    ("raw", "raw completion"),
    ("context", "benign context"),
    ("system", "ignore-instructions system"),
    ("relearn", "in-context relearning"),
    ("logprob", "log-prob probe"),
    ("sample", "sampling (T=1)"),
    ("quant8", "8-bit RTN"),
    ("quant4", "4-bit RTN"),
]


def attack_columns(methods: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(summary key, header, format) of the attacks present in any method's summary."""
    present = {k for m in methods for k in m["summary"] if k.startswith("attack_")}
    return [(f"attack_{n}_leak", label, "{:.2f}") for n, label in ATTACK_LABELS if f"attack_{n}_leak" in present]


def attack_findings(methods: list[dict[str, Any]]) -> list[str]:
    """Plain sentences for every ULD / UOE row that leaks more than twice as much under an attack."""
    lines = []
    for m in methods:
        if m.get("kind") not in ("uld", "uoe") or "attacks" not in m:
            continue
        none = m["summary"].get("attack_none_leak")
        for name in m["attacks"].get("worse_than_twice", []):
            value = m["summary"].get(f"attack_{name}_leak")
            label = dict(ATTACK_LABELS).get(name, name)
            lines.append(f"- **{m['label']} does worse under {label}**: it leaks {value:.2f} of the forget facts, "
                         f"more than twice its {none:.2f} without attack.")
    return lines


def attack_section(methods: list[dict[str, Any]]) -> list[str]:
    columns = attack_columns(methods)
    if not columns:
        return []
    parts = ["## Attacks", "", summary_table([(m["label"], m["summary"]) for m in methods], columns), ""]
    parts.append(
        "Leak rate: share of forget questions whose answer gives away more than half of the reference answer's "
        "words that are not in the question (training/leak.py). No attack: the training questions as asked. "
        "Paraphrase: TOFU's paraphrased question. Raw completion: the question without any template. Benign "
        "context: the question inside a longer request. Ignore-instructions system: after a system prompt that "
        "tells the model to ignore its instructions. In-context relearning: other QA pairs of the same subject "
        "as earlier turns. Log-prob probe: the reference token is in the top 5 of the top-20 log-probabilities "
        "where the greedy answer leaves the reference. 8/4-bit RTN (UOE only): the patched model's weights "
        "rounded to nearest."
    )
    findings = attack_findings(methods)
    parts.append("")
    if findings:
        parts += ["Where ULD / UOE leak more than twice as much under an attack as without one:", "", *findings]
    elif any(m.get("kind") in ("uld", "uoe") for m in methods):
        parts.append("Every ULD / UOE row leaks at most twice its no-attack rate under every attack.")
    parts.append("")
    return parts


def render_report(metrics: dict[str, Any], plot_names: list[str], title: str) -> str:
    methods = metrics["methods"]
    parts = [f"# {title}", ""]
    parts.append(f"Model: `{metrics.get('model')}`; questions per split: "
                 + ", ".join(f"{k} {v}" for k, v in metrics.get("splits", {}).items()) + ".")
    if not metrics.get("retain_reference"):
        parts.append("No --retain-reference given: forget quality (FQ) is not computed.")
    parts += ["", summary_table([(m["label"], m["summary"]) for m in methods]), ""]
    parts.append(
        "FQ: KS-test p-value of forget truth ratios vs the retain-only model (higher = closer to never "
        "trained on the forget set). MU: harmonic mean of probability, ROUGE-L recall and truth ratio on "
        "retain, real authors and world facts. ES / EM: extraction strength / exact memorisation. "
        "Fluency PPL: the base model's perplexity of the forget answers generated; loops: share of those "
        "answers with a repeated n-gram loop."
    )
    parts += [""] + attack_section(methods)
    parts += ["## Per split", ""]
    for m in methods:
        parts.append(f"### {m['label']}")
        parts.append("")
        parts.append("| split | probability | ROUGE-L recall | truth ratio | ES | EM |")
        parts.append("|---|---|---|---|---|---|")
        for split, s in m["splits"].items():
            sm = s["summary"]
            prob = sm.get("probability_normalised", sm.get("probability"))
            parts.append(
                f"| {split} | {fmt(prob)} | {fmt(sm.get('rouge'))} | {fmt(sm.get('truth_ratio'))} | "
                f"{fmt(sm.get('extraction_strength'))} | {fmt(sm.get('exact_memorization'))} |"
            )
        gens = m["splits"]["forget"]["per_question"]["generated"][:2]
        if gens:
            parts.append("")
            parts.append("Forget answers (first two): " + " / ".join(f"`{g[:120]}`" for g in gens))
        parts.append("")
    parts += ["## Plots", ""] + [f"![{n}]({n})" for n in plot_names] + [""]
    return "\n".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fq_axis(methods: list[dict[str, Any]]) -> tuple[str, str]:
    if any(m["summary"].get("forget_quality") is not None for m in methods):
        return "forget_quality", "forget quality (KS p-value, log scale)"
    return "forget_truth_ratio", "forget truth ratio (no --retain-reference)"


def plot_fq_vs_mu(metrics: dict[str, Any], path: str | Path) -> Path:
    """Scatter of forget quality vs model utility, one labelled point per method."""
    plt = _pyplot()
    methods = metrics["methods"]
    key, label = _fq_axis(methods)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    markers = "osD^vP*Xh<>p"
    for i, m in enumerate(methods):
        x, y = m["summary"].get("model_utility"), m["summary"].get(key)
        if x is None or y is None:
            continue
        y = max(y, 1e-30) if key == "forget_quality" else y
        # a legend, not annotations: methods often land on top of each other
        ax.scatter([x], [y], s=45, marker=markers[i % len(markers)], label=m["label"], alpha=0.85)
    if ax.collections:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if key == "forget_quality":
        ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel(label)
    ax.set_title("Forget quality vs model utility")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_alpha_sweep(metrics: dict[str, Any], path: str | Path) -> Path | None:
    """For each ULD artifact evaluated at several alphas: FQ (or forget TR) and MU against alpha."""
    plt = _pyplot()
    methods = metrics["methods"]
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for m in methods:
        if m["kind"] == "uld" and m.get("alpha") is not None:
            sweeps.setdefault(m["artifact"], []).append(m)
    sweeps = {k: v for k, v in sweeps.items() if len(v) > 1}
    if not sweeps:
        return None
    key, label = _fq_axis(methods)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    for name, runs in sweeps.items():
        runs = sorted(runs, key=lambda m: m["alpha"])
        alphas = [m["alpha"] for m in runs]
        fq = [m["summary"].get(key) for m in runs]
        mu = [m["summary"].get("model_utility") for m in runs]
        if all(v is not None for v in fq):
            ax1.plot(alphas, [max(v, 1e-30) for v in fq] if key == "forget_quality" else fq, "o-", label=name)
        if all(v is not None for v in mu):
            ax2.plot(alphas, mu, "o-", label=name)
    if key == "forget_quality":
        ax1.set_yscale("log")
    ax1.set_xlabel("alpha")
    ax1.set_ylabel(label)
    ax2.set_xlabel("alpha")
    ax2.set_ylabel("model utility")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ULD: forget quality and model utility vs alpha")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_attacks(metrics: dict[str, Any], path: str | Path) -> Path | None:
    """Grouped bars: leak rate per attack (x) per method (bars)."""
    methods = metrics["methods"]
    columns = attack_columns(methods)
    if not columns:
        return None
    plt = _pyplot()
    import numpy as np

    x = np.arange(len(columns))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(columns) + 2), 4.2), dpi=100)
    for i, m in enumerate(methods):
        values = [m["summary"].get(key) for key, _, _ in columns]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, heights, width, label=m["label"])
        for bar, v in zip(bars, values, strict=True):
            if v is None:
                bar.set_hatch("//")
                bar.set_alpha(0.2)
    ax.set_xticks(x)
    ax.set_xticklabels([label for _, label, _ in columns], rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("leak rate (forget questions)")
    ax.set_title("Leak rate per attack and method")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
