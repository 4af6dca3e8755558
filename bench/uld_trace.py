"""Where did the unlearning change an answer? A trace of served greedy answers against the target's own choices.

Serves the SmolLM2 harness's forget questions (bench/uld_quality.py: 8 questions + 8 paraphrases, or the 16 outsider
wordings) through the engine with a ULD artifact at its defaults (or `--alpha`), then scores each answer once more
with and without unlearning (`prompt_logprobs=1`: each position's best token). A position where the target's best
token differs from the one served is a *substitution*, printed as `[served|target's]`; every other token is the
target's own greedy choice given the text so far. For each answer it also says whether it loops (the harness's
`has_loop`) and, for a looping answer, whether its loop starts at a substitution or is the target's own continuation.

    python bench/uld_trace.py --artifact ~/.cache/unlearn-serve/demo/smollm2-forget-harry-potter-<key>
    python bench/uld_trace.py --artifact DIR --alpha 2 --checks outsider --all
    python bench/uld_trace.py --artifact DIR --interference   # where the rule penalises the target's own best token
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="a ULD artifact for SmolLM2 (e.g. the demo's)")
    parser.add_argument("--alpha", type=float, help="serve at this alpha (default: the artifact's)")
    parser.add_argument("--checks", choices=("harness", "outsider"), default="harness")
    parser.add_argument("--all", action="store_true", help="trace every forget answer (default: the looping ones)")
    parser.add_argument("--general", action="store_true", help="trace the 12 general questions instead")
    parser.add_argument(
        "--facts",
        action="store_true",
        help="instead: at each fact token of the base's own forget answers, the assistant's preference for it "
        "(logits above its median over the candidates), the penalty it gets and the target's lead to overcome",
    )
    parser.add_argument(
        "--interference",
        action="store_true",
        help="instead: on the base's own greedy answers to four question sets (forget, retain set, the 12 general, the "
        "40 broad), the share of positions where the serving rule penalises the target's best token, and where the "
        "LoRA prefers it by more than 1 / 2 logits beyond the early exit",
    )
    parser.add_argument("--no-repeat-substitution", type=int, help="the engine's repeat guard n-gram size (0 = off)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    import uld_quality
    from unlearn_serve.server.engine.engine import Engine, EngineConfig
    from unlearn_serve.server.engine.sequence import Selection
    from unlearn_serve.training.data import encode_prompt
    from unlearn_serve.training.leak import has_loop

    from unlearn_serve.evaluation.trace import substitution_share, trace_answers

    torch.set_num_threads(args.threads)
    suite = uld_quality.smollm2_suite()
    checks = uld_quality.HP_OUTSIDER_CHECKS if args.checks == "outsider" else suite.forget_checks
    questions = [c.question for c in checks] + [c.paraphrase or c.question for c in checks]
    kind = "forget"
    if args.general:
        questions, kind = [c.question for c in suite.retain_checks], "general"
    model, tokenizer = suite.model_loader()
    config = EngineConfig(max_num_seqs=32, max_model_len=512, no_repeat_substitution=args.no_repeat_substitution)
    engine = Engine(model, tokenizer, config, "base")
    assistant = engine.load_uld("forget", args.artifact)
    if args.interference:
        sets = {
            "forget (8 + 8 paraphrases)": questions,
            "retain set (trained on)": [r["question"] for r in suite.retain_records if "question" in r],
            "general (12)": [c.question for c in suite.retain_checks],
            "broad (40)": [c.question for c in uld_quality.BROAD_CHECKS],
        }
        interference(engine, model, tokenizer, args.artifact, sets, assistant, args.alpha)
        return 0
    if args.facts:
        return fact_preferences(engine, model, tokenizer, args.artifact, questions, checks, assistant, args.alpha)
    selection = Selection("forget", {} if args.alpha is None else {"alpha": args.alpha})
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    traces = trace_answers(engine, prompts, selection, suite.max_tokens)
    loops = entered = 0
    for q, t in zip(questions, traces, strict=True):
        looping = has_loop(t.text)
        loops += looping
        if looping:
            start = first_repeat(t.tokens)
            entered += start is not None and any(t.substituted[max(0, start - 1) : start + 1])
        if looping or args.all:
            flag = " (LOOPS)" if looping else ""
            print(f"Q: {q}{flag}\n   {t.marked(tokenizer.decode)!r}")
            print(f"   substitutions {sum(t.substituted)}/{len(t.tokens)}")
    print(
        f"\n{len(questions)} {kind} answers at alpha {args.alpha if args.alpha is not None else 'default'}: "
        f"{substitution_share(traces):.1%} of their tokens substituted; {loops} loop{'s' if loops != 1 else ''}, "
        f"{entered} of them entered at a substitution"
    )
    return 0


def scored_answers(engine, model, tokenizer, artifact: Path, questions, assistant, alpha, max_tokens: int, prefer):
    """The base's own greedy answers to `questions`, each with what the serving rule sees at its positions: yields
    (answer token ids, target logits, assistant logits, early-exit logits, candidate mask, penalty), the penalty the
    rule's own (`assistant_penalty`, margin and gate of the artifact, times `alpha`; `prefer`: the rule)."""
    import copy
    import math

    import torch
    from peft import PeftModel
    from unlearn_serve.server.engine.sampling_params import SamplingParams
    from unlearn_serve.training.data import encode_prompt

    from unlearn_serve.assistant import assistant_logits
    from unlearn_serve.uld_combine import assistant_penalty, plausible_mask

    combine, layers = assistant.combine, assistant.num_layers
    helper = PeftModel.from_pretrained(copy.deepcopy(model), str(artifact)).eval()
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    answers = [r.completions[0].token_ids for r in engine.generate(prompts, params, None)]
    for p, a in zip(prompts, answers, strict=True):
        ids = torch.tensor([list(p) + list(a)])
        positions = slice(len(p) - 1, -1)
        with torch.no_grad():
            target = model(ids).logits[0, positions].float()
            helper_logits = assistant_logits(helper, ids, None, layers)[0, positions].float()
            with helper.disable_adapter():  # the early exit: the assistant without its LoRA
                early = assistant_logits(helper, ids, None, layers)[0, positions].float()
        keep = plausible_mask(target, torch.full((len(a),), math.log(assistant.filter)))
        gated = combine.gate is not None
        penalty = alpha * assistant_penalty(helper_logits, keep, prefer, combine.margin, early, gated)
        yield a, target, helper_logits, early, keep, penalty


def fact_preferences(engine, model, tokenizer, artifact: Path, questions, checks, assistant, alpha) -> int:
    """Print, for each fact token in the base's own greedy forget answers, what the `prefer` rule does there: the
    assistant's logit above its median over the candidates (`d`), the penalty alpha * max(0, d - margin), and the
    target's lead of that token over its runner-up (the penalty must exceed it to remove the fact *there*)."""
    alpha = assistant.alpha if alpha is None else alpha
    print(
        f"alpha {alpha:g}, margin {assistant.combine.margin:g}, filter {assistant.filter:g}; "
        "fact tokens of the base's own answers:"
    )
    removed = total = 0
    scored = scored_answers(engine, model, tokenizer, artifact, questions, assistant, alpha, 48, True)
    for q, check, (a, target, helper_logits, _, keep, penalties) in zip(
        questions, list(checks) * 2, scored, strict=True
    ):
        # d for display (negative: below the median)
        above = helper_logits - helper_logits.masked_fill(~keep, float("nan")).nanmedian(-1, keepdim=True).values
        for i, token in enumerate(a):
            piece = tokenizer.decode([token]).strip().lower()
            if len(piece) < 3 or not any(k.lower().startswith(piece) for k in check.keywords):
                continue
            others = target[i].clone()
            others[token] = float("-inf")
            lead = float(target[i, token] - others.max())
            d = float(above[i, token])
            penalty = float(penalties[i, token])
            total += 1
            removed += penalty > lead
            print(
                f"  {q[:48]:48} {tokenizer.decode([token])!r:12} d {d:5.2f}  penalty {penalty:5.2f}  "
                f"target's lead {lead:5.2f}  {'removed here' if penalty > lead else 'kept here'}"
            )
    print(f"{removed}/{total} fact tokens removed at their own position; the rest only if the answer turns earlier")
    return 0


def interference(engine, model, tokenizer, artifact: Path, sets: dict, assistant, alpha) -> dict[str, tuple]:
    """Per question set, over the positions of the base's own greedy answers (32 tokens): the share where the serving
    rule (the artifact's rule, margin and gate at `alpha`) penalises the target's own best token (what can change an
    answer that should stay), and where the LoRA prefers that token by more than 1 and 2 logits beyond the early exit
    (the `prefer` preference of assistant - early exit: the gate's measure without the margin). Returns
    {set: (positions, share penalised, share > 1, share > 2)}."""
    import torch

    from unlearn_serve.uld_combine import assistant_penalty

    alpha = assistant.alpha if alpha is None else alpha
    combine = assistant.combine
    print(f"alpha {alpha:g}, rule {combine.rule}, margin {combine.margin:g}, gate {combine.gate}")
    out: dict[str, tuple] = {}
    for name, questions in sets.items():
        positions = penalised = 0
        added: list[float] = []
        prefer = combine.rule == "prefer"
        for a, target, helper_logits, early, keep, penalty in scored_answers(
            engine, model, tokenizer, artifact, questions, assistant, alpha, 32, prefer
        ):
            best = target.argmax(-1, keepdim=True)
            positions += len(a)
            penalised += int((penalty.gather(1, best) > 0).sum())
            added += assistant_penalty(helper_logits - early, keep, True, 0.0).gather(1, best)[:, 0].tolist()
        over = torch.tensor(added)
        share = penalised / max(1, positions)
        out[name] = (positions, share, float((over > 1).float().mean()), float((over > 2).float().mean()))
        print(
            f"  {name:28} {positions:5d} positions: best token penalised {out[name][1]:6.1%}; "
            f"LoRA prefers it beyond the early exit by > 1: {out[name][2]:6.1%}, > 2: {out[name][3]:6.1%}"
        )
    return out


def first_repeat(tokens: list[int], n: int = 3) -> int | None:
    """Index where the first token n-gram that occurs again later in `tokens` starts (its second occurrence), or
    None: the point where the answer starts repeating itself."""
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            return i
        seen[gram] = i
    return None


if __name__ == "__main__":
    raise SystemExit(main())
