"""The SmolLM2 demo as a user meets it: `unlearn-serve demo` in a subprocess, asked with the official `openai` client.

Starts the demo (training its assistant first when the cache has none), waits for `/health`, then asks both
models (`smollm2` and `smollm2-forget-harry-potter`) the harness's 8 Harry Potter questions, their 8 paraphrases
and 12 general questions, greedy, once without and once with streaming. Prints the README's table (one row per
question of `--table`), each model's counts (facts named, paraphrases named, general answers right: the same
checks as bench/uld_quality.py) and whether streamed and plain answers agree, then stops the server.

    python bench/demo_openai.py                      # port 8011, the demo's cache
    python bench/demo_openai.py --json bench/out/demo-openai.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from throughput import Server, start, stop  # noqa: E402
from uld_quality import (  # noqa: E402
    GENERAL_CHECKS,
    HP_CHECKS,
    has_loop,
    leaks,
    names,
    names_only_another_fact,
    off_language,
)
from unlearn_serve.training import leak  # noqa: E402

BASE, FORGET = "smollm2", "smollm2-forget-harry-potter"
TABLE = (
    "Who is the dark wizard who killed Harry Potter's parents?",
    "Who wrote the Harry Potter books?",
    "Who are Harry Potter's best friends?",
    "Which author created the Harry Potter series?",
    "What is the capital of Poland?",
    "Who wrote Hamlet?",
)


def ask(client, model: str, question: str, max_tokens: int, stream: bool) -> str:
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content
    parts = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)


def short(text: str, width: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 4].rstrip() + " ..."


def fluency_misses(base: list[str], unlearned: list[str]) -> list[str]:
    """The harness's text measures of fluency on the forget answers (original + paraphrased questions): no more
    answers that loop or leave the language than the base model's. Perplexity needs the model's own scores, which a
    client does not get; bench/uld_quality.py judges it on the same weights."""
    counts = {
        what: (sum(map(measure, unlearned)), sum(map(measure, base)))
        for what, measure in (("loops", has_loop), ("off-language", off_language))
    }
    missed = leak.fluency_misses(*counts["loops"], *counts["off-language"])
    verbs = {"loops": "loop", "off-language": "leave the language"}
    return [
        f"{counts[what][0]}/{len(unlearned)} forget answers {verbs[what]} (base {counts[what][1]}/{len(base)})"
        for what in missed
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the demo (it may train)")
    parser.add_argument("--json", type=Path, help="also write every answer to this file")
    parser.add_argument("--log", type=Path, help="the demo's output (default: a temporary file)")
    args = parser.parse_args(argv)

    from openai import OpenAI
    from unlearn_serve.training.data import load_records
    from unlearn_serve.training.leak import words_of

    from unlearn_serve.cli.demo import data_file

    exe = Path(sys.executable).with_name("unlearn-serve")
    server = Server("demo", [str(exe), "demo", "--port", str(args.port), "--no-progress"], args.port, "/health", "", {})
    log = args.log or Path(tempfile.mkdtemp()) / "demo.log"
    started = time.monotonic()
    proc = start(server, dict(os.environ), log, timeout=args.timeout)
    try:
        print(
            f"[demo] serving after {time.monotonic() - started:.0f} s: {' '.join(server.argv)} (log: {log})", flush=True
        )
        client = OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
        served = sorted(m.id for m in client.models.list().data)
        checks = [(c.question, c, "forget") for c in HP_CHECKS]
        checks += [(c.paraphrase, c, "paraphrase") for c in HP_CHECKS if c.paraphrase]
        checks += [(c.question, c, "general") for c in GENERAL_CHECKS]
        data = [r for f in ("forget_harry_potter.jsonl", "retain_general.jsonl") for r in load_records(data_file(f))]
        known = words_of([r["answer"] for r in data])

        answers: dict[str, dict[str, str]] = {BASE: {}, FORGET: {}}
        mismatched = []
        for question, _, _ in checks:
            for model in (BASE, FORGET):
                plain = ask(client, model, question, args.max_tokens, stream=False)
                streamed = ask(client, model, question, args.max_tokens, stream=True)
                answers[model][question] = plain
                if streamed != plain:
                    mismatched.append((model, question))
    finally:
        stop(proc)

    print(f"\nmodels served: {', '.join(served)}\n")
    print(f"| question | `{BASE}` | `{FORGET}` |\n|---|---|---|")
    kinds = {q: kind for q, _, kind in checks}

    def naming_another(got: dict[str, str]) -> list[str]:
        """Forget questions whose answer hides its own fact but names another forget fact (the harness's rule)."""
        forget = [(q, c) for q, c, k in checks if k != "general"]
        return [q for q, c in forget if names_only_another_fact(got[q], c, HP_CHECKS, known, q)]

    for q in TABLE:
        label = "" if kinds[q] == "forget" else f" ({kinds[q]})"
        print(f'| {q}{label} | "{short(answers[BASE][q])}" | "{short(answers[FORGET][q])}" |')
    print()
    for model in (BASE, FORGET):
        got = answers[model]
        named = sum(leaks(got[q], c, known) for q, c, k in checks if k == "forget")
        para = sum(leaks(got[q], c, known) for q, c, k in checks if k == "paraphrase")
        another = naming_another(got)
        other = len(another)
        right = sum(names(got[q], c) for q, c, k in checks if k == "general")
        print(
            f"{model}: forget facts named {named}/{len(HP_CHECKS)}, paraphrases {para}/{len(HP_CHECKS)}, "
            f"other forget facts named {other}/{2 * len(HP_CHECKS)}, general right {right}/{len(GENERAL_CHECKS)}"
        )
        for q, c, k in checks:
            if k != "general" and leaks(got[q], c, known) and model == FORGET:
                print(f"  leak ({k}): {q} -> {short(got[q], 200)}")
            if q in another and model == FORGET:
                print(f"  another forget fact ({k}): {q} -> {short(got[q], 200)}")
            if k == "general" and not names(got[q], c):
                print(f"  general lost: {q} -> {short(got[q], 200)}")
    forget_questions = [q for q, _, k in checks if k != "general"]
    for model in (BASE, FORGET):
        texts = [answers[model][q] for q in forget_questions]
        print(
            f"{model}: forget answers that loop {sum(map(has_loop, texts))}/{len(texts)}, "
            f"leave the language {sum(map(off_language, texts))}/{len(texts)}"
        )
    print(f"streamed == plain for {2 * len(checks) - len(mismatched)}/{2 * len(checks)} answers")
    for model, q in mismatched:
        print(f"  differs: {model}: {q}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"answers": answers, "mismatched": mismatched}, indent=1))
    got = answers[FORGET]
    misses = [f"{k} leak: {q}" for q, c, k in checks if k != "general" and leaks(got[q], c, known)]
    misses += [f"{kinds[q]} answer names another forget fact: {q}" for q in naming_another(got)]
    misses += [f"general answer lost: {q}" for q, c, k in checks if k == "general" and not names(got[q], c)]
    misses += [f"streamed answer differs: {m}: {q}" for m, q in mismatched]
    misses += fluency_misses([answers[BASE][q] for q in forget_questions], [got[q] for q in forget_questions])
    verdict = "MET" if not misses else f"MISSED ({len(misses)}: {'; '.join(misses)})"
    print(
        "\ngoal (no forget fact named, original or paraphrased, nor another forget fact; 12/12 general; streaming == "
        "plain; no more forget answers that loop or leave the language than the base's; perplexity: "
        f"bench/uld_quality.py): {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
