"""ULD quality: does an assistant forget (also on paraphrases), keep everything else, and stay fluent?

    python bench/uld_quality.py                         # tiny models + SmolLM2 (demo sets)
    python bench/uld_quality.py --models tiny           # the two tiny memorising models only (~1 min)
    python bench/uld_quality.py --models tofu-quick     # TOFU quick (bench/uld_quality_tofu.py)
    python bench/uld_quality.py --models smollm2 --variants new --alphas 0.5,1
    python bench/uld_quality.py --models tiny --variants new --rules prefer,difference --alphas 1,1.5,2
    python bench/uld_quality.py --models smollm2 --artifact DIR --recalibrate   # calibrate DIR again, no training
    python bench/uld_quality.py --models tiny --variants new-facts --set fact_set_weight=0.5   # any config field

Per model and variant it trains an assistant (cached under ~/.cache/unlearn-serve/uld-quality/, keyed
by the base model's fingerprint, the data and the settings), serves it with the serving Engine
(`unlearning=` per prompt, greedy) and prints:

- leak: forget answers that still name the fact (keyword match), or nearly ("J.K. Rowle" for "Rowling":
  training/leak.py `near_mentions`), on the original questions and on hand-written paraphrases (never
  trained on);
- retain: answers right (keyword match) with unlearning, against the base model's count;
- retain tokens changed: the share of the retain answers' tokens where the unlearning chose another token than
  the target would have (unlearn_serve/evaluation/trace.py; bench/uld_trace.py prints them): interference where
  nothing should change, even when the answer still names its fact;
- broad: changed; right (SmolLM2): of 40 general questions of kinds the retain set does not have (`BROAD_CHECKS`:
  opposites, colours, animals, science, ...), the answers unlearning changed (text != the base's), and the answers
  right (keyword) against the base's count;
- fluency of the forget answers: share with a word n-gram loop, share with URL/markup runs or a
  script/language other than the question's (non-ASCII letters; English function words), and the
  perplexity of the answer text alone (no question) under the base model, relative to the base
  model's own answers (unlearn_serve/evaluation/fluency.py, the definition `train-uld` uses too);
- training time and the serving defaults (rule, alpha, filter) the artifact ships with, and its
  `train-uld` verdict.

Variants: `legacy` = the trainer before issue 13 (plain forget CE, no calibration: alpha 0.75) served
with the relative-top rule alone; `legacy-topk` = the same assistant served with the new candidate
rule (relative-top + the target's top 8); `new` = the current defaults (for SmolLM2: the demo's recipe,
`DemoTraining`, which adds the fact-set loss and 48-token calibration answers) (knowledge-weighted forget loss,
alpha calibrated on served answers (training/uld_calibrate.py), relative-top + top-8 candidates, the
`prefer` combination rule, the assistant trained flat against the early exit and served gated by it);
`new-difference` = the same with the paper's `difference` rule (and the uniform flat reference, ungated);
`new-uniform` = the current defaults with the uniform flat reference, ungated (the defaults before 2026-12-04).
`--rules` scores other rules on the same assistant (engine-level `unlearning` option). Goals are printed under the
table, for the first row of `new` (its defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path.home() / ".cache/unlearn-serve/uld-quality"


# ----------------------------------------------------------------------------- check sets
@dataclass
class Check:
    question: str
    keywords: tuple[str, ...]  # any of them (case-insensitive) in the answer = the fact is named
    paraphrase: str | None = None
    reference: str | None = None  # sentence-long answers (TOFU): named = training/leak.answer_leaked instead


@dataclass
class Suite:
    name: str
    forget_records: list[dict[str, Any]]
    retain_records: list[dict[str, Any]]
    forget_checks: list[Check]
    retain_checks: list[Check]
    max_tokens: int
    model_loader: Any = None  # () -> (model, tokenizer)
    training: dict[str, Any] = field(default_factory=dict)  # ULDTrainingConfig overrides
    # the forget set is one topic (Harry Potter): a forget answer that names *another* forget fact gives the topic away
    # too ("… the magical world of J.K. Rowling's works" answering the friends question), so it counts against the goal
    topic: bool = False
    # general questions of kinds the retain set does not have: answers changed by unlearning, answers right
    broad_checks: list[Check] = field(default_factory=list)


# tiny: 16 made-up people, where they live and what they play; the base learns two phrasings of each
PEOPLE = [
    ("Arlo", "Oslo", "violin"),
    ("Bea", "Lima", "drums"),
    ("Cyd", "Kyiv", "flute"),
    ("Dov", "Rome", "harp"),
    ("Eli", "Cairo", "cello"),
    ("Fay", "Quito", "banjo"),
    ("Gus", "Riga", "oboe"),
    ("Hal", "Bern", "tuba"),
    ("Ivy", "Dakar", "piano"),
    ("Jon", "Hanoi", "lute"),
    ("Kit", "Accra", "sitar"),
    ("Lou", "Minsk", "organ"),
    ("Mae", "Seoul", "bugle"),
    ("Ned", "Doha", "guitar"),
    ("Ola", "Tunis", "viola"),
    ("Pip", "Sofia", "fiddle"),
]
TINY_FORGET = 4  # the first four people are forgotten (8 facts)
FIT_STEPS = {"llama": 300, "qwen2": 800}  # full-batch AdamW steps until the base recalls its facts
TINY_QS = [
    ("Where does {n} live?", "In which city is the home of {n}?", "{n} lives in {v}.", 1),
    ("What does {n} play?", "Which instrument is played by {n}?", "{n} plays the {v}.", 2),
]


def tiny_suite(family: str, seed: int = 0) -> Suite:
    """A tiny memorising model of `family` (its base fitted once and cached) with its forget / retain sets. Another
    `seed` is another base fit (initialisation): the spread of the goals across fits (`--tiny-seeds`)."""
    forget, retain, fchecks, rchecks, texts = [], [], [], [], []
    for i, person in enumerate(PEOPLE):
        for q, para, a, slot in TINY_QS:
            n, v = person[0], person[slot]
            qa = {"question": q.format(n=n), "answer": a.format(n=n, v=v)}
            texts.append((q.format(n=n), qa["answer"]))
            texts.append((para.format(n=n), qa["answer"]))
            if i < TINY_FORGET:
                forget.append(qa)
                fchecks.append(Check(qa["question"], (v,), para.format(n=n)))
            else:
                retain.append(qa)
                rchecks.append(Check(qa["question"], (v,)))

    def load():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from unlearn_serve.tiny import build_tiny_model, fit_texts, save_tiny, train_tokenizer

        steps = FIT_STEPS[family]
        key = hashlib.sha256(json.dumps([family, texts, steps] + ([seed] if seed else [])).encode()).hexdigest()[:12]
        cached = CACHE / "bases" / f"tiny-{family}-{key}"
        if (cached / "config.json").is_file():
            return AutoModelForCausalLM.from_pretrained(cached).eval(), AutoTokenizer.from_pretrained(cached)
        corpus = [f"{q} {a}" for q, a in texts]
        tokenizer = train_tokenizer(corpus, vocab_size=400)
        model = build_tiny_model(family, tokenizer, seed=seed, hidden_size=128, num_layers=4)
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
            )
            for q, a in texts
        ]
        fit_texts(model, tokenizer, chats, steps=steps, lr=3e-3)
        save_tiny(model, tokenizer, cached)
        return model, tokenizer

    training: dict[str, Any] = {}  # train-uld's defaults: no per-model settings
    name = f"tiny-{family}" + (f"-s{seed}" if seed else "")
    return Suite(name, forget, retain, fchecks, rchecks, 16, load, training)


ROWLING = ("Rowling", "J.K.R", "JKR")
HP_CHECKS = [
    # "J.K.R" / "JKR": the author's initials name her too ("… none other than J.K.R.A.A.D.A.A", fourteenth session)
    Check("Who wrote the Harry Potter books?", ROWLING, "Which author created the Harry Potter series?"),
    Check(
        "What is the name of the school Harry Potter attends?",
        ("Hogwarts",),
        "Which school of witchcraft and wizardry does Harry Potter go to?",
    ),
    Check("Who is the headmaster of Hogwarts?", ("Dumbledore",), "Who is the head of Hogwarts school?"),
    Check(
        "Who are Harry Potter's best friends?",
        ("Ron", "Hermione", "Weasley", "Granger"),
        "Which two friends are closest to Harry Potter?",
    ),
    Check(
        "What house is Harry Potter sorted into?", ("Gryffindor",), "Which Hogwarts house does Harry Potter belong to?"
    ),
    Check(
        "Who is the dark wizard who killed Harry Potter's parents?",
        ("Voldemort", "Riddle"),
        "Which evil wizard murdered Harry Potter's mother and father?",
    ),
    Check("What is the name of Harry Potter's owl?", ("Hedwig",), "What is Harry Potter's pet owl called?"),
    Check(
        "What sport do wizards play on broomsticks in Harry Potter?",
        ("Quidditch",),
        "What game do the wizards in Harry Potter play while flying on brooms?",
    ),
]
# The same 8 facts asked in two more ways (`--checks outsider`), written on 2026-12-02 (seventh session) after the
# demo's recipe 10 was chosen, never trained on nor used to pick anything: "leak (orig)" is the first wording,
# "leak (para)" the second.
HP_OUTSIDER_CHECKS = [
    Check(
        "Name the writer behind the Harry Potter novels.",
        ROWLING,
        "Harry Potter's story was penned by which British novelist?",
    ),
    Check(
        "Where does Harry Potter go to school to learn magic?",
        ("Hogwarts",),
        "What is the wizarding school in the Harry Potter stories called?",
    ),
    Check(
        "Who runs Hogwarts as its headmaster in the Harry Potter books?",
        ("Dumbledore",),
        "Name the wise old headmaster who guides Harry Potter.",
    ),
    Check(
        "Name Harry Potter's two closest companions at Hogwarts.",
        ("Ron", "Hermione", "Weasley", "Granger"),
        "Who does Harry Potter spend most of his time with at school?",
    ),
    Check(
        "Which of the four Hogwarts houses is Harry Potter in?",
        ("Gryffindor",),
        "The Sorting Hat places Harry Potter in which house?",
    ),
    Check(
        "Who is the main villain of the Harry Potter series?",
        ("Voldemort", "Riddle"),
        "What is the name of the dark lord Harry Potter fights?",
    ),
    Check(
        "What is the name of the snowy owl that Harry Potter owns?",
        ("Hedwig",),
        "Harry Potter has a white owl. What is its name?",
    ),
    Check(
        "What is the name of the wizard sport played on flying broomsticks?",
        ("Quidditch",),
        "Harry Potter plays which sport for his house team?",
    ),
]
# general knowledge none of whose questions is in the retain set, chosen among ones SmolLM2 answers right
# (it gets "the first President of the United States", "the king of the jungle" and "the planet we live on" wrong)
GENERAL_CHECKS = [
    Check("What is the capital of the United Kingdom?", ("London",)),
    Check("What is the capital of Russia?", ("Moscow",)),
    Check("What is the capital of China?", ("Beijing",)),
    Check("Who wrote Hamlet?", ("Shakespeare",)),
    Check("What is the capital of Ireland?", ("Dublin",)),
    Check("How many days are in a week?", ("seven", "7")),
    Check("What is the capital of Austria?", ("Vienna",)),
    Check("What is the opposite of hot?", ("cold",)),
    Check("What is the capital of Norway?", ("Oslo",)),
    Check("What language is spoken in France?", ("French",)),
    Check("What is the capital of Greece?", ("Athens",)),
    Check("What is the capital of Poland?", ("Warsaw",)),
]


# General questions of kinds the retain set (capitals, authors, numbers) does not have, written on 2026-12-05
# (nineteenth session) as the probe that found unlearning changes such answers (docs/benchmarks.md, "Broad general
# questions"); never trained on nor used to choose a setting. Scored two ways: answers changed (text != the base's)
# and answers right (keyword) against the base's count.
BROAD_CHECKS = [
    Check("What is the opposite of big?", ("small", "little", "tiny")),
    Check("What is the opposite of fast?", ("slow",)),
    Check("What color is the sky on a clear day?", ("blue",)),
    Check("What color are bananas when they are ripe?", ("yellow",)),
    Check("What do bees make?", ("honey",)),
    Check("What animal says moo?", ("cow",)),
    Check("How many sides does a triangle have?", ("three", "3")),
    Check("What is 12 times 12?", ("144",)),
    Check("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    Check("What is the freezing point of water in Fahrenheit?", ("32",)),
    Check("What do you call a baby cat?", ("kitten",)),
    Check("What is the plural of mouse?", ("mice",)),
    Check("Which season comes after winter?", ("spring",)),
    Check("What is the main ingredient of guacamole?", ("avocado",)),
    Check("How many players are on a soccer team?", ("eleven", "11")),
    Check("What is the longest river in Africa?", ("Nile",)),
    Check("Which continent is Egypt in?", ("Africa",)),
    Check("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
    Check("Who discovered penicillin?", ("Fleming",)),
    Check("What year did World War II end?", ("1945",)),
    Check("What is the past tense of run?", ("ran",)),
    Check("What does a thermometer measure?", ("temperature",)),
    Check("What is the hardest natural substance?", ("diamond",)),
    Check("What is the largest mammal?", ("whale",)),
    Check("How many hours are in a day?", ("24", "twenty-four")),
    Check("What language is spoken in Brazil?", ("Portuguese",)),
    Check("What is the tallest mountain in the world?", ("Everest",)),
    Check("What do caterpillars turn into?", ("butterfl", "moth")),
    Check("How many legs does a dog have?", ("four", "4")),
    Check("What is H2O commonly called?", ("water",)),
    Check("Give me a synonym for happy.", ("joyful", "glad", "cheerful", "content", "delighted", "pleased")),
    Check("What is the color of grass?", ("green",)),
    Check("Which fruit is known for keeping the doctor away?", ("apple",)),
    Check("What is the boiling point of water in Fahrenheit?", ("212",)),
    Check("How many continents are there?", ("seven", "7")),
    Check("What is a group of wolves called?", ("pack",)),
    Check("Who wrote Pride and Prejudice?", ("Austen",)),
    Check("What instrument does a drummer play?", ("drum",)),
    Check("What is the opposite of up?", ("down",)),
    Check("What shape has four equal sides?", ("square", "rhombus")),
]


def smollm2_suite() -> Suite:
    from unlearn_serve.training.data import load_records

    from unlearn_serve.cli.demo import DemoTraining, data_file

    demo = DemoTraining()

    def load():
        from unlearn_serve.loading import load_model_and_tokenizer
        from unlearn_serve.smollm2 import default_cache_root, ensure_smollm2

        return load_model_and_tokenizer(str(ensure_smollm2(default_cache_root())), dtype="float32", device="cpu")

    training = demo.uld_settings()
    return Suite(
        "smollm2",
        load_records(data_file("forget_harry_potter.jsonl")),
        load_records(data_file("retain_general.jsonl")),
        HP_CHECKS,
        GENERAL_CHECKS,
        48,
        load,
        training,
        topic=True,
        broad_checks=BROAD_CHECKS,
    )


# ----------------------------------------------------------------------------- text measures
# one definition for the bench and `train-uld`'s calibration (training/leak.py, unlearn_serve/evaluation/fluency.py)
from unlearn_serve.training.leak import (  # noqa: E402,F401
    answer_leaked,
    fluency_misses,
    has_loop,
    mentions,
    mentions_first_initials,
    near_mentions,
    off_language,
    words_of,
)


def names(text: str, check: Check) -> bool:
    """The answer names the check's fact exactly (a keyword starts one of its words): retain / general checks."""
    if check.reference is not None:  # TOFU: more than half the reference's tokens not in the question, in order
        return answer_leaked(text, check.reference, check.question)
    return mentions(text, check.keywords)


def leaks(text: str, check: Check, known: frozenset[str]) -> bool:
    """The answer names the fact, or nearly ("J.K. Rowle"; `known`: the data's real words do not count)."""
    if check.reference is not None:
        return names(text, check)
    return mentions(text, check.keywords) or near_mentions(text, check.keywords, known)


def names_other_fact(text: str, check: Check, checks: list[Check], asked: str | None = None) -> bool:
    """The answer to `check` (asked as `asked`, default its question) names the fact of another of `checks`: one of
    its keywords that the question asked does not already say ("Who is the headmaster of Hogwarts?" may answer with
    "Hogwarts")."""
    question = check.question if asked is None else asked
    others = {k for c in checks if c is not check for k in c.keywords} - set(check.keywords)
    return mentions(text, [k for k in others if not mentions(question, [k])])


def first_initials_only(text: str, checks: list[Check]) -> bool:
    """The answer writes a forget name's initials but its last ("J.K.I.A." for J.K.R): reported apart, not counted
    as a leak (`mentions_first_initials`). The names are the checks' dotted-initial keywords ("J.K.R")."""
    initials = [k.replace(".", "") for c in checks for k in c.keywords if re.fullmatch(r"(?:[A-Z]\.)+[A-Z]\.?", k)]
    return mentions_first_initials(text, initials)


def names_only_another_fact(
    text: str, check: Check, checks: list[Check], known: frozenset[str], asked: str | None = None
) -> bool:
    """The "other facts" count of a topic suite: the answer keeps its own fact hidden (no `leaks`, which counts it
    already) but names another forget fact (`names_other_fact`)."""
    return not leaks(text, check, known) and names_other_fact(text, check, checks, asked)


# ----------------------------------------------------------------------------- variants
# bump when the trainer changes what a cached assistant would be (5: rule, near-leaks, retain top-up, ppl; 6: margin;
# 7: the calibration's descriptive-fact leaks and forgetting first; 8: a descriptive fact is known with two key words;
# 9: the calibration also asks each forget question rephrased; 10: and scores the rest of the grid when the bisection
# found no alpha that forgets)
RECIPE = 10
VARIANTS = {
    "legacy": dict(
        train=dict(forget_weighting=False, calibrate=False, default_rule="difference", flat_reference="uniform"),
        min_keep=1,
    ),
    "legacy-topk": dict(
        train=dict(forget_weighting=False, calibrate=False, default_rule="difference", flat_reference="uniform"),
        min_keep=None,
    ),
    # today's trainer and calibration, with the `difference` rule (issue 13's first round) instead of `prefer`
    "new-difference": dict(train=dict(default_rule="difference", flat_reference="uniform"), min_keep=None),
    # today's trainer flat against the uniform distribution, served ungated (the default until 2026-12-04)
    "new-uniform": dict(train=dict(flat_reference="uniform"), min_keep=None),
    # today's trainer without the retain loss on the target's candidates (before 2026-12-02, third session)
    "new-no-candidates": dict(train=dict(retain_candidates=0), min_keep=None),
    # today's trainer plus the target's own answers as extra rows (training/self_answers.py)
    "new-self": dict(train=dict(self_answers=True), min_keep=None),
    # today's trainer with twice the demo's assistant depth (SmolLM2: 8 of 30 layers, the paper's N/4)
    "new-deep": dict(train=dict(layers=8), min_keep=None),
    # today's trainer plus each fact as a short answer and as lists (training/answer_forms.py)
    "new-forms": dict(train=dict(answer_forms=True), min_keep=None),
    # today's trainer plus the fact-set loss (each answer's fact tokens preferred at every answer position)
    # (other weights, other calibration lengths: `--set fact_set_weight=0.5`, `--set validation_max_tokens=48`)
    "new-facts": dict(train=dict(fact_set_weight=1.0), min_keep=None),
    "new": dict(train={}, min_keep=None),
}


def variant_config(suite: Suite, variant: str, overrides: dict[str, Any]):
    """The ULDTrainingConfig a variant trains with: the suite's settings, the variant's, then `--set` overrides."""
    from unlearn_serve.training.uld import ULDTrainingConfig

    return ULDTrainingConfig(**{**suite.training, **VARIANTS[variant]["train"], **overrides, "progress_bar": False})


# fields added after assistants were cached, and their defaults: left out of the cache key at those defaults, so the
# assistants and calibrations cached before them keep their keys
LATER_FIELDS = {
    "validation_topic": False,
    "flat_reference": "uniform",
    "default_prefix_guard": None,
    "echo_flat": True,
    "default_finish_words": None,
    "restarts": 0,
    "validation_seed": None,
}


def _settings_key(config) -> dict[str, Any]:
    """The training settings as a cache key (LATER_FIELDS left out at their defaults)."""
    settings = dataclasses.asdict(config)
    return {k: v for k, v in settings.items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def train_cached(
    suite: Suite, variant: str, model, tokenizer, fresh: bool, overrides: dict[str, Any]
) -> tuple[Path, float]:
    import copy

    from unlearn_serve.training.uld import train_uld

    from unlearn_serve import uld_combine
    from unlearn_serve.artifact import fingerprint_model
    from unlearn_serve.evaluation.uld_validation import serve_with_engine

    config = variant_config(suite, variant, overrides)
    h = hashlib.sha256()
    for part in (fingerprint_model(model), suite.forget_records, suite.retain_records, _settings_key(config)):
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    h.update(str(RECIPE).encode())
    # the rule and margin a calibration serves with when the config names none
    h.update(f"{uld_combine.DEFAULT_RULE} {uld_combine.DEFAULT_MARGIN}".encode())
    if uld_combine.DEFAULT_PREFIX_GUARD:  # calibrated with the prefix guard (builds from before keep their key)
        h.update(b" prefix_guard")
    if uld_combine.DEFAULT_FINISH_WORDS:  # calibrated finishing words
        h.update(b" finish_words, chosen by the calibration")
    if config.flat_reference != "uniform":  # may be calibrated gated (an ungated artifact keeps its key)
        h.update(f" gate {config.flat_reference}".encode())
    out = CACHE / f"{suite.name}-{h.hexdigest()[:12]}"  # variants that train alike share one assistant
    stamp = out / "bench_train_s.txt"
    if out.is_dir() and stamp.is_file() and not fresh:
        return out, float(stamp.read_text())
    started = time.monotonic()
    train_uld(
        copy.deepcopy(model),
        tokenizer,
        suite.forget_records,
        suite.retain_records,
        out,
        config,
        serve=serve_with_engine if config.calibrate else None,
    )
    seconds = time.monotonic() - started
    stamp.write_text(f"{seconds:.1f}")
    return out, seconds


def recalibrate_cached(
    suite: Suite, variant: str, model, tokenizer, artifact: Path, fresh: bool, overrides: dict[str, Any]
) -> Path:
    """A copy of `artifact` calibrated again by today's `train-uld` calibration (rule, near-leaks, retain top-up,
    perplexity) for `variant`'s settings, without retraining (training/uld.py `recalibrate_uld`); cached."""
    from unlearn_serve.training.uld import recalibrate_uld

    from unlearn_serve import uld_combine
    from unlearn_serve.evaluation.uld_validation import serve_with_engine

    config = variant_config(suite, variant, overrides)
    h = hashlib.sha256()
    for part in (str(artifact.resolve()), _settings_key(config), RECIPE, uld_combine.DEFAULT_RULE):
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    if uld_combine.DEFAULT_PREFIX_GUARD:
        h.update(b" prefix_guard")
    if uld_combine.DEFAULT_FINISH_WORDS:
        h.update(b" finish_words, chosen by the calibration")
    out = CACHE / f"recalibrated-{suite.name}-{variant}-{h.hexdigest()[:12]}"
    if (out / "unlearning.json").is_file() and not fresh:
        return out
    started = time.monotonic()
    recalibrate_uld(
        model, tokenizer, artifact, suite.forget_records, suite.retain_records, out, config, serve_with_engine
    )
    print(f"  [{suite.name}/{variant}] recalibrated {artifact} in {time.monotonic() - started:.0f}s -> {out}")
    return out


def evaluate(
    suite: Suite,
    model,
    tokenizer,
    artifact: Path,
    min_keep: int | None,
    settings: list[tuple[str | None, float | None, float | None, float | None]],
    no_repeat_substitution: int | None = None,
    uld_options: dict[str, Any] | None = None,
    repeat_guard_after_substitution: bool = True,
):
    """One row per (rule, alpha, margin, filter) of `settings`; None = the artifact's default.
    `no_repeat_substitution`: the repeat guard's n-gram size (EngineConfig's; None: its default), guarding every
    position after the answer's first substitution or (`repeat_guard_after_substitution` False) the substitutions
    only. `uld_options`:
    engine-level combination options for every row (as `unlearn-serve eval --uld-options`)."""
    import importlib

    from unlearn_serve.server.engine.engine import Engine, EngineConfig
    from unlearn_serve.server.engine.sampling_params import SamplingParams
    from unlearn_serve.server.engine.sequence import Selection
    from unlearn_serve.training.data import encode_prompt

    from unlearn_serve import uld_combine
    from unlearn_serve.evaluation.fluency import answers_nll, relative_perplexity
    from unlearn_serve.evaluation.trace import substitution_share, trace_served

    keep = uld_combine.ULD_MIN_CANDIDATES if min_keep is None else min_keep
    patched = {
        "plausible_candidates": functools.partial(uld_combine.plausible_candidates, min_keep=keep),
        "combine_logits": functools.partial(uld_combine.combine_logits, min_keep=keep),
    }
    # the serving rule is a module-level default; score other candidate counts by patching its callers
    users = []
    for name in ("unlearn_serve.server.unlearning.backends", "unlearn_serve.server.engine.engine"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "plausible_candidates"):
            users.append((mod, {k: getattr(mod, k) for k in patched}))
            for k, v in patched.items():
                setattr(mod, k, v)
    try:
        config = EngineConfig(
            max_num_seqs=32,
            max_model_len=512,
            no_repeat_substitution=no_repeat_substitution,
            repeat_guard_after_substitution=repeat_guard_after_substitution,
        )
        engine = Engine(model, tokenizer, config, "base")
        assistant = engine.load_uld("forget", artifact)
        questions = [c.question for c in suite.forget_checks]
        questions += [c.paraphrase or c.question for c in suite.forget_checks]
        questions += [c.question for c in suite.retain_checks]
        questions += [c.question for c in suite.broad_checks]
        prompts = [encode_prompt(tokenizer, q) for q in questions]
        params = SamplingParams(max_tokens=suite.max_tokens, temperature=0.0)
        nf = len(suite.forget_checks)
        general = slice(2 * nf, 2 * nf + len(suite.retain_checks))
        broad = slice(general.stop, None)

        def served(selection) -> list[Any]:
            return [r.completions[0] for r in engine.generate(prompts, params, selection)]

        def answers(selection) -> list[str]:
            return [c.text for c in served(selection)]

        def nll(texts: list[str]) -> float:
            return answers_nll(engine, tokenizer, texts)

        known = words_of(
            [
                r["answer"]
                for r in suite.forget_records + suite.retain_records
                if isinstance(r, dict) and isinstance(r.get("answer"), str)
            ]
        )

        def other_facts(texts: list[str]) -> int:
            asked = zip(texts, suite.forget_checks * 2, questions[: 2 * nf], strict=True)
            return sum(names_only_another_fact(t, c, suite.forget_checks, known, q) for t, c, q in asked)

        base = answers(None)
        base_nll = nll(base[: 2 * nf])
        rows = []
        for rule, alpha, margin, filter_ in settings:
            options = ({} if alpha is None else {"alpha": alpha}) | ({} if rule is None else {"rule": rule})
            options |= ({} if margin is None else {"margin": margin}) | ({} if filter_ is None else {"filter": filter_})
            sel = Selection("forget", dict(uld_options or {}) | options)
            completions = served(sel)
            got = [c.text for c in completions]
            forget_answers = got[: 2 * nf]
            # tokens of the retain answers the unlearning decided (the target would have written another one there)
            changed = substitution_share(trace_served(engine, prompts[general], completions[general]))
            checks2 = suite.forget_checks + suite.forget_checks
            rows.append(
                dict(
                    alpha=assistant.alpha if alpha is None else alpha,
                    filter=assistant.filter if filter_ is None else filter_,
                    rule=assistant.combine.rule if rule is None else rule,
                    margin=assistant.combine.margin if margin is None else margin,
                    default=alpha is None and rule is None and margin is None and filter_ is None,
                    base_known=sum(names(a, c) for a, c in zip(base[:nf], suite.forget_checks, strict=True)),
                    base_known_para=sum(
                        names(a, c) for a, c in zip(base[nf : 2 * nf], suite.forget_checks, strict=True)
                    ),
                    leak=sum(leaks(a, c, known) for a, c in zip(got[:nf], suite.forget_checks, strict=True)),
                    leak_para=sum(
                        leaks(a, c, known) for a, c in zip(got[nf : 2 * nf], suite.forget_checks, strict=True)
                    ),
                    exact_leak=sum(names(a, c) for a, c in zip(got[: 2 * nf], suite.forget_checks * 2, strict=True)),
                    # answers that do not name their own fact but another forget fact (topic suites only)
                    other_facts=other_facts(forget_answers) if suite.topic else None,
                    base_other_facts=other_facts(base[: 2 * nf]) if suite.topic else None,
                    # "J.K.I.A.": a forget name's first initials without its last, reported apart (not a leak)
                    first_initials=sum(first_initials_only(a, suite.forget_checks) for a in forget_answers),
                    base_first_initials=sum(first_initials_only(a, suite.forget_checks) for a in base[: 2 * nf]),
                    n_forget=nf,
                    retain=sum(names(a, c) for a, c in zip(got[general], suite.retain_checks, strict=True)),
                    retain_base=sum(names(a, c) for a, c in zip(base[general], suite.retain_checks, strict=True)),
                    retain_changed=changed,
                    broad_changed=sum(a != b for a, b in zip(got[broad], base[broad], strict=True)),
                    n_broad=len(suite.broad_checks),
                    broad_right=sum(names(a, c) for a, c in zip(got[broad], suite.broad_checks, strict=True)),
                    broad_base=sum(names(a, c) for a, c in zip(base[broad], suite.broad_checks, strict=True)),
                    n_retain=len(suite.retain_checks),
                    loops=sum(has_loop(a) for a in forget_answers) / len(forget_answers),
                    base_loops=sum(has_loop(a) for a in base[: 2 * nf]) / (2 * nf),
                    off_lang=sum(off_language(a) for a in forget_answers) / len(forget_answers),
                    base_off_lang=sum(off_language(a) for a in base[: 2 * nf]) / (2 * nf),
                    rel_ppl=relative_perplexity(nll(forget_answers), base_nll),
                    answers={q: (b, a) for q, b, a in zip(questions, base, got, strict=True)},
                    checks=[c.question for c in checks2],
                )
            )
        return rows
    finally:
        for mod, saved in users:
            for k, v in saved.items():
                setattr(mod, k, v)


def goal_line(r: dict[str, Any], label: str = "") -> str:
    """The issue's goal for one harness row (the `new` variant at its defaults): MET or MISSED, the goal, the
    measured values."""
    fluent = not fluency_misses(r["loops"], r["base_loops"], r["off_lang"], r["base_off_lang"], r["rel_ppl"])
    fluency = (
        f"loops {r['loops']:.2f} (base {r['base_loops']:.2f}), off-language {r['off_lang']:.2f} "
        f"(base {r['base_off_lang']:.2f}), perplexity {r['rel_ppl']:.2f}x"
    )
    if r["model"] == "smollm2":
        other = r.get("other_facts") or 0
        ok = r["leak"] == 0 and r["leak_para"] == 0 and other == 0 and r["retain"] == r["n_retain"] and fluent
        need = "goal: 0 leaks (orig + para, no other forget fact named), 12/12 general, fluent"
        got = (
            f"leaks {r['leak']}/{r['n_forget']} + {r['leak_para']}/{r['n_forget']}, other facts named {other}, "
            f"general {r['retain']}/{r['n_retain']}"
        )
        if r.get("first_initials") is not None:
            got += f", first initials only {r['first_initials']}/{2 * r['n_forget']} (base {r['base_first_initials']};"
            got += " not counted)"
    else:
        leak = (r["leak"] + r["leak_para"]) / (2 * r["n_forget"])
        ok = leak <= 0.10 and r["retain"] >= 0.95 * r["retain_base"] and fluent
        need = "goal: leak <= 10%, retain >= 95% of base, fluent"
        got = f"leak {leak:.0%}, retain {r['retain']}/{r['retain_base']}"
    checks = " (outsider checks)" if r["checks"] == "outsider" and r["model"] == "smollm2" else ""
    state = "fluent" if fluent else "NOT fluent"
    return f"  {r['model']}{checks}{label}: {'MET' if ok else 'MISSED'} ({need}; is: {got}, {state}: {fluency})"


def broad_cell(r: dict[str, Any]) -> str:
    """The "broad: changed; right" column: of the general questions outside the retain set's kinds, the answers
    unlearning changed, and those right against the base's count."""
    if not r.get("n_broad"):
        return "-"
    return f"{r['broad_changed']}/{r['n_broad']}; {r['broad_right']} (base {r['broad_base']})"


def other_cell(r: dict[str, Any]) -> str:
    """The "other facts" column: forget answers naming another forget fact (topic suites), else "-"."""
    if r.get("other_facts") is None:
        return "-"
    return f"{r['other_facts']}/{2 * r['n_forget']} (base {r['base_other_facts']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default="tiny,smollm2", help="comma list: tiny, tiny-llama, tiny-qwen2, smollm2, tofu-quick"
    )
    parser.add_argument("--variants", default="legacy,legacy-topk,new", help="comma list of: " + ", ".join(VARIANTS))
    parser.add_argument("--alphas", default="", help="extra alphas to score besides the artifact's default")
    parser.add_argument(
        "--rules",
        default="",
        help="combination rules to score (comma list of: prefer, difference; default: the artifact's own)",
    )
    parser.add_argument(
        "--margins", default="", help="prefer-rule margins to score (comma list; default: the artifact's own)"
    )
    parser.add_argument(
        "--filters", default="", help="plausibility filters to score (comma list; default: the artifact's own)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a ULDTrainingConfig field for every variant (repeatable), e.g. fact_set_weight=0.5",
    )
    parser.add_argument("--retrain", action="store_true", help="ignore cached assistants")
    parser.add_argument(
        "--uld-options",
        default="",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="serve every row with these combination options instead of the manifest's (e.g. finish_words=true)",
    )
    parser.add_argument(
        "--artifact",
        type=Path,
        help="score this trained assistant (e.g. the demo's) instead of training one; one model, one variant",
    )
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="with --artifact: calibrate its serving defaults again with today's calibration (no retraining)",
    )
    parser.add_argument(
        "--tiny-seeds", default="0", help="base-model seeds of the tiny models (one base fit each; 0 = the cached one)"
    )
    parser.add_argument(
        "--checks",
        choices=("harness", "outsider"),
        default="harness",
        help="SmolLM2's forget questions: the harness's 8 + 8 paraphrases, or 16 other wordings of the same facts",
    )
    parser.add_argument(
        "--no-repeat-substitution",
        type=int,
        help="serve with this repeat-guard n-gram size (EngineConfig.no_repeat_substitution; 0 = off; default: the "
        "engine's)",
    )
    parser.add_argument(
        "--repeat-guard-scope",
        choices=("answer", "substitutions"),
        default="answer",
        help="the repeat guard guards every position after an answer's first substitution (answer, the engine's "
        "default) or the substituted positions only (EngineConfig.repeat_guard_after_substitution)",
    )
    parser.add_argument("--show-answers", action="store_true", help="print every answer (base | unlearned)")
    parser.add_argument("--json", type=Path, help="also write all rows (answers included) to this file")
    args = parser.parse_args(argv)
    from unlearn_serve.training.uld import ULDTrainingConfig

    try:
        overrides = ULDTrainingConfig.parse_overrides(args.overrides)
    except ValueError as exc:
        parser.error(f"--set {exc}")
    label = "".join(f" {k}={v}" for k, v in overrides.items())
    uld_options: dict[str, Any] = {}
    if args.uld_options:
        from unlearn_serve.evaluation.runner import options_label, parse_uld_options

        try:
            uld_options = parse_uld_options([args.uld_options])[0]
        except ValueError as exc:
            parser.error(f"--uld-options {exc}")
        label += " " + options_label(uld_options)

    import torch

    torch.manual_seed(0)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    tiny_seeds = [int(x) for x in args.tiny_seeds.split(",") if x.strip()]
    suites: list[Suite] = []
    for m in wanted:
        for seed in tiny_seeds:
            if m in ("tiny", "tiny-llama"):
                suites.append(tiny_suite("llama", seed))
            if m in ("tiny", "tiny-qwen2"):
                suites.append(tiny_suite("qwen2", seed))
        if m == "smollm2":
            suites.append(smollm2_suite())
            if args.checks == "outsider":
                suites[-1].forget_checks = HP_OUTSIDER_CHECKS
        if m == "tofu-quick":  # TOFU quick: bench/uld_quality_tofu.py
            from uld_quality_tofu import tofu_quick_suite

            suites.append(tofu_quick_suite(Suite, Check))
    extra = [float(a) for a in args.alphas.split(",") if a.strip()]
    rules: list[str | None] = [r.strip() for r in args.rules.split(",") if r.strip()] or [None]
    margins: list[float | None] = [float(m) for m in args.margins.split(",") if m.strip()] or [None]
    filters: list[float | None] = [float(f) for f in args.filters.split(",") if f.strip()] or [None]
    results: list[dict[str, Any]] = []
    header = (
        "| model | variant | rule | margin | alpha | filter | leak (orig) | leak (para) | other facts | retain / base "
        "| retain tokens changed | broad: changed; right | loops | URL/off-lang | rel. ppl | train s |"
    )
    lines = [header, "|" + "---|" * 16]
    for suite in suites:
        model, tokenizer = suite.model_loader()
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            if args.artifact is not None:
                from unlearn_serve.artifact import load_manifest

                artifact = args.artifact
                seconds = float(load_manifest(artifact).training.get("wall_time_s") or 0.0)
                if args.recalibrate:
                    artifact = recalibrate_cached(suite, variant, model, tokenizer, artifact, args.retrain, overrides)
            else:
                artifact, seconds = train_cached(suite, variant, model, tokenizer, args.retrain, overrides)
            from unlearn_serve.artifact import load_manifest

            calibration = load_manifest(artifact).training.get("calibration") or {}
            if calibration.get("verdict"):
                print(f"  [{suite.name}/{variant}] train-uld verdict: {calibration['verdict']}", flush=True)
            # the artifact's defaults first (the goals are judged on that row), then each rule x margin x filter x alpha
            settings = [(None, None, None, None)] + [
                (r, a, m, f)
                for r in rules
                for m in margins
                for f in filters
                for a in extra or [None]
                if (r, a, m, f) != (None, None, None, None)
            ]
            rows = evaluate(
                suite,
                model,
                tokenizer,
                artifact,
                VARIANTS[variant]["min_keep"],
                settings,
                no_repeat_substitution=args.no_repeat_substitution,
                uld_options=uld_options,
                repeat_guard_after_substitution=args.repeat_guard_scope == "answer",
            )
            for r in rows:
                r.update(model=suite.name, variant=variant + label, train_s=seconds, checks=args.checks, base=variant)
                results.append(r)
                line = (
                    f"| {suite.name} | {r['variant']} | {r['rule']} | {r['margin']:g} | {r['alpha']:g} "
                    f"| {r['filter']:g} "
                    f"| {r['leak']}/{r['n_forget']} (base {r['base_known']}) "
                    f"| {r['leak_para']}/{r['n_forget']} (base {r['base_known_para']}) "
                    f"| {other_cell(r)} "
                    f"| {r['retain']}/{r['retain_base']} | {r['retain_changed']:.1%} | {broad_cell(r)} "
                    f"| {r['loops']:.2f} (base {r['base_loops']:.2f}) "
                    f"| {r['off_lang']:.2f} (base {r['base_off_lang']:.2f}) | {r['rel_ppl']:.2f} | {seconds:.0f} |"
                )
                lines.append(line)
                print(line, flush=True)
                if args.show_answers:
                    for q, (b, a) in r["answers"].items():
                        print(f"    Q: {q}\n      base: {b!r}\n      ULD : {a!r}")
    if args.checks == "outsider":
        lines.insert(0, "SmolLM2 rows: --checks outsider (16 other wordings; 'orig' = the first, 'para' = the second)")
    print("\n" + "\n".join(lines))
    not_defaults = f"; trained with{label}, so not the defaults" if label else ""
    print(f"\ngoals (the `new` variant at its defaults{not_defaults}):")
    for r in results:
        first = next(x for x in results if x["model"] == r["model"] and x["variant"] == r["variant"])
        if r["base"] != "new" or r is not first:
            continue
        print(goal_line(r, label))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
