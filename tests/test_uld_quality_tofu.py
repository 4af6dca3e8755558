"""TOFU quick in the ULD quality harness (bench/uld_quality_tofu.py) and the calibrated-alpha rows of bench/tofu.py:
the data selection, the checks and their leak rule on TOFU's sentence-long answers, no model trained."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from shared_data import require_tofu

TOFU = require_tofu()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import tofu  # noqa: E402
import uld_quality  # noqa: E402
import uld_quality_tofu  # noqa: E402


@pytest.fixture(scope="module")
def suite():
    return uld_quality_tofu.tofu_quick_suite(uld_quality.Suite, uld_quality.Check, tofu_dir=TOFU)


def test_suite_is_the_quick_bench_data(suite):
    cfg = tofu.BenchConfig.quick()
    data = tofu.select_data(cfg, TOFU)
    assert suite.name == "tofu-quick" and suite.training == cfg.uld_settings()
    assert suite.retain_records == data["uld_retain"]
    # the forgotten author's 20 rows, without the paraphrased questions the harness checks (held out)
    assert [r["question"] for r in suite.forget_records] == [r["question"] for r in data["forget"]]
    assert all("paraphrased_question" not in r and r["paraphrased_answer"] for r in suite.forget_records)
    assert all("paraphrased_question" in r for r in data["forget"])  # the bench's own rows are untouched
    assert len(suite.forget_checks) == cfg.forget_authors * tofu.QPA == 20
    assert all(c.paraphrase and c.paraphrase != c.question and c.reference for c in suite.forget_checks)
    n = uld_quality_tofu.TOFU_RETAIN_CHECKS + 2 * uld_quality_tofu.TOFU_GENERAL_CHECKS
    assert len(suite.retain_checks) == n and all(c.reference for c in suite.retain_checks)
    retain_questions = {r["question"] for r in data["retain"]}
    forget_questions = {c.question for c in suite.forget_checks}
    assert not forget_questions & {c.question for c in suite.retain_checks}
    assert sum(c.question in retain_questions for c in suite.retain_checks) == uld_quality_tofu.TOFU_RETAIN_CHECKS


def test_leak_rule_on_long_answers(suite):
    check = suite.forget_checks[0]  # "Who is the notable author born in Astana, Kazakhstan on ...?"
    assert check.reference.startswith("The notable author born on this date is Nikolai Abilov, an LGBTQ+ author")
    for rule in (uld_quality.names, lambda text, c: uld_quality.leaks(text, c, frozenset())):
        assert rule(check.reference, check)
        # more than half of the reference's tokens that are not in the question, in order: a leak
        assert rule("This date is Nikolai Abilov's, an LGBTQ+ author recognized in the African American genre.", check)
        # the question's wording, or a part of the answer only (here: the name alone), is not
        assert not rule("The notable author born in Astana, Kazakhstan on the 7th of February, 1952 is a man.", check)
        assert not rule("The notable author born on this date is Nikolai Abilov.", check)
        assert not rule("", check)
    # a one-word general answer: the reference rule is the keyword rule
    paris = next(c for c in suite.retain_checks if c.reference == "Paris")
    assert uld_quality.names("It is in Paris, France.", paris) and not uld_quality.names("In Berlin.", paris)
    # keyword checks (the other models) are unchanged
    plain = uld_quality.Check("Where does Arlo live?", ("Oslo",))
    assert uld_quality.names("Arlo lives in Oslo.", plain) and not uld_quality.names("Arlo lives in Rome.", plain)


class _M:
    def __init__(self, label, kind, artifact=None, alpha=None, options=None):
        self.label, self.alpha, self.options = label, alpha, options or {}


def test_bench_rows_include_the_calibrated_alpha():
    assert tofu.BenchConfig().alphas[0] is None and tofu.BenchConfig.quick().alphas[0] is None

    from unlearn_serve.evaluation import runner

    class E:
        Method = _M
        options_label = staticmethod(runner.options_label)

    rows = tofu.uld_methods(E, (None, 0.25, 0.5, 1.0), 0.5)
    assert [(m.label, m.alpha) for m in rows] == [
        ("ULD α=0.5 (calibrated default)", None),
        ("ULD α=0.25", 0.25),
        ("ULD α=1", 1.0),
    ]
    rows = tofu.uld_methods(E, (0.5, None), None)  # not calibrated: the artifact's default, unnamed
    assert [(m.label, m.alpha) for m in rows] == [("ULD α=0.5", 0.5), ("ULD α=default", None)]
    # --uld-options: the same alphas with other serving settings, named in the labels and passed to the engine
    rows = tofu.uld_methods(E, (None, 1.0), 0.5, {"floor": 6, "margin": 2})
    assert [(m.label, m.alpha, m.options) for m in rows] == [
        ("ULD α=0.5 (calibrated default) floor=6 margin=2", None, {"floor": 6, "margin": 2}),
        ("ULD α=1 floor=6 margin=2", 1.0, {"floor": 6, "margin": 2}),
    ]


def test_headline_goal_lines_say_met_or_by_how_much_and_whether_the_row_ships():
    """bench/tofu.py prints the TOFU headline goal per ULD row: MET, or MISSED with each shortfall; only the row at
    the manifest's own alpha with no serving options counts as the defaults."""

    def row(label, kind, fq, mu, alpha=None):
        return {"label": label, "kind": kind, "alpha": alpha, "summary": {"forget_quality": fq, "model_utility": mu}}

    metrics = {
        "methods": [
            row("target", "base", 1e-27, 0.9),
            row("ULD α=1.5 (calibrated default)", "uld", 0.32, 0.879),
            row("ULD α=1.5 (calibrated default) margin=2", "uld", 0.81, 0.894),
            row("ULD α=1.25", "uld", 0.6, 0.85, alpha=1.25),
            row("GA", "model", 0.9, 0.1),
        ]
    }
    lines = tofu.headline_lines(metrics)
    assert len(lines) == 3  # ULD rows only
    assert "[the defaults]" in lines[0] and lines[0].endswith("MISSED (FQ short by 0.18, MU short by 0.003x)")
    assert "[not the defaults]" in lines[1] and lines[1].endswith("(0.993x): MET")
    assert "[not the defaults]" in lines[2] and lines[2].endswith("MISSED (MU short by 0.036x)")
    assert tofu.headline_lines({"methods": [row("ULD α=1", "uld", 0.6, 0.9)]}) == []  # no target row: nothing


def test_recalibrate_needs_a_reused_assistant(capsys):
    """--recalibrate calibrates an existing artifact again; without --reuse-uld there is none: refused up front."""
    with pytest.raises(SystemExit) as exc:
        tofu.main(["--quick", "--targets", "dense", "--methods", "uld", "--recalibrate"])
    assert exc.value.code == 2 and "--recalibrate needs --reuse-uld" in capsys.readouterr().err


def test_demo_openai_table_asks_the_harness_questions():
    """bench/demo_openai.py prints its README table from the harness's own checks: every row is one of them."""
    import demo_openai

    asked = {c.question for c in uld_quality.HP_CHECKS + uld_quality.GENERAL_CHECKS}
    asked |= {c.paraphrase for c in uld_quality.HP_CHECKS if c.paraphrase}
    assert set(demo_openai.TABLE) <= asked
    assert demo_openai.short("a | b\nc", 160) == "a \\| b c" and demo_openai.short("x" * 200, 20).endswith(" ...")


def test_tiny_seeds_are_other_base_fits_with_the_same_data():
    """--tiny-seeds: seed 0 keeps the cached suite's name (and base cache key); another seed is another suite."""
    plain, other = uld_quality.tiny_suite("llama"), uld_quality.tiny_suite("llama", 2)
    assert (plain.name, other.name) == ("tiny-llama", "tiny-llama-s2")
    assert plain.forget_records == other.forget_records and plain.retain_records == other.retain_records
    assert [c.question for c in plain.forget_checks] == [c.question for c in other.forget_checks]


def test_set_overrides_a_config_field_for_every_variant(capsys):
    """`--set FIELD=VALUE` (bench/uld_quality.py) and `--uld-set` (bench/tofu.py) read values as JSON where they parse,
    reach the trained config after the variant's own settings, and refuse an unknown field up front (exit 2)."""
    from unlearn_serve.training.uld import ULDTrainingConfig

    parsed = ULDTrainingConfig.parse_overrides(["fact_set_weight=0.5", "default_rule=difference", "default_floor=null"])
    assert parsed == {"fact_set_weight": 0.5, "default_rule": "difference", "default_floor": None}
    for bad in ("fact_set_weight", "fact_set_weight=", "no_such_field=1"):
        with pytest.raises(ValueError, match="expected FIELD=VALUE"):
            ULDTrainingConfig.parse_overrides([bad])
    suite = uld_quality.tiny_suite("llama")
    config = uld_quality.variant_config(suite, "new-facts", {"fact_set_weight": 3.0, "validation_max_tokens": 48})
    assert (config.fact_set_weight, config.validation_max_tokens) == (3.0, 48)
    assert uld_quality.variant_config(suite, "new-facts", {}).fact_set_weight == 1.0
    for main, flag in ((uld_quality.main, "--set"), (tofu.main, "--uld-set")):
        with pytest.raises(SystemExit) as exc:
            main([flag, "no_such_field=1"])
        assert exc.value.code == 2 and "no field 'no_such_field'" in capsys.readouterr().err
        # a field's bad value too, before anything is trained
        with pytest.raises(SystemExit) as exc:
            main([flag, "flat_reference=bad"])
        assert exc.value.code == 2 and "flat_reference must be one of" in capsys.readouterr().err


def test_a_reused_assistant_keeps_its_training_time(tmp_path):
    """--reuse-uld rows report the training time the reused assistant's manifest recorded, not an empty cell."""
    import json

    (tmp_path / "unlearning.json").write_text(
        json.dumps({"defaults": {"alpha": 2.0}, "training": {"steps": 7, "wall_time_s": 123.4, "calibration": {}}})
    )
    summary = tofu.reused_uld_summary(tmp_path)
    assert summary["training_time_s"] == 123.4 and summary["default_alpha"] == 2.0 and summary["steps"] == 7
    (tmp_path / "unlearning.json").write_text(json.dumps({"training": {}}))
    assert tofu.reused_uld_summary(tmp_path)["training_time_s"] is None
    # auto trained both flat references: both builds' time, the kept one named with the comparison
    compared = {
        "kept": "uniform",
        "why": "w",
        "early_exit": {"verdict": "e", "wall_time_s": 100.0},
        "uniform": {"verdict": "u", "wall_time_s": 20.5},
    }
    training = {"wall_time_s": 20.5, "flat_reference": "uniform", "flat_reference_compared": compared}
    (tmp_path / "unlearning.json").write_text(json.dumps({"training": training}))
    summary = tofu.reused_uld_summary(tmp_path)
    assert summary["training_time_s"] == 120.5 and summary["flat_reference"] == "uniform"
    assert summary["compared"] == {"kept": "uniform", "why": "w", "early_exit": "e", "uniform": "u"}


def test_outsider_checks_ask_the_harness_facts_in_wordings_never_trained_on():
    """`--checks outsider`: the same 8 facts (same keywords, same order) as the harness's SmolLM2 checks, in 16 other
    wordings, none of them a forget-set question nor a harness question."""
    from unlearn_serve.training.data import load_records

    from unlearn_serve.cli.demo import data_file

    harness, outsider = uld_quality.HP_CHECKS, uld_quality.HP_OUTSIDER_CHECKS
    assert [c.keywords for c in outsider] == [c.keywords for c in harness]
    asked = {q for c in outsider for q in (c.question, c.paraphrase)}
    assert len(asked) == 16 and None not in asked
    trained = {r["question"] for r in load_records(data_file("forget_harry_potter.jsonl"))}
    assert not asked & (trained | {q for c in harness for q in (c.question, c.paraphrase)})


def test_harness_goal_line_says_met_or_missed_with_the_measured_values():
    """The harness's goal line judges the `new` row at its defaults and shows what was measured, not only the goal
    (seed 1's `MISSED (0 leaks ..., fluent: True)` read as if it had met the leak goal)."""
    row = dict(
        model="smollm2", checks="harness", leak=1, leak_para=1, n_forget=8, retain=12, n_retain=12, retain_base=12,
        loops=0.12, base_loops=0.25, off_lang=0.0, base_off_lang=0.0, rel_ppl=1.85,
    )  # fmt: skip
    line = uld_quality.goal_line(row, " seed=1")
    assert "MISSED" in line and "is: leaks 1/8 + 1/8, other facts named 0, general 12/12, fluent" in line
    assert "1.85x" in line
    met = uld_quality.goal_line({**row, "leak": 0, "leak_para": 0})
    assert "MET (" in met and "MISSED" not in met
    assert "NOT fluent" in uld_quality.goal_line({**row, "leak": 0, "leak_para": 0, "rel_ppl": 2.18})
    tiny = {**row, "model": "tiny-llama", "leak": 1, "leak_para": 0, "retain": 24, "retain_base": 24}
    assert "MET (goal: leak <= 10%" in uld_quality.goal_line(tiny) and "is: leak 6%" in uld_quality.goal_line(tiny)


def test_demo_openai_goal_counts_loops_and_language_against_the_base():
    """The client-side goal judges fluency with the harness's text measures: more looping or off-language forget
    answers than the base model's is a miss, as many is not."""
    import demo_openai

    fluent = "Harry Potter is a series of novels about a young wizard and his friends at school."
    looping = "He created the first draft of the first draft of the first draft of the series."
    url = "Das ist https://twitter.com/harry für mehr."
    assert demo_openai.fluency_misses([fluent, looping], [looping, fluent]) == []
    misses = demo_openai.fluency_misses([fluent, fluent], [looping, url])
    assert misses == [
        "1/2 forget answers loop (base 0/2)",
        "1/2 forget answers leave the language (base 0/2)",
    ]
    # the rule itself (training/leak.py), shared with the harness's goal line: perplexity only where measured
    from unlearn_serve.training.leak import MAX_RELATIVE_PERPLEXITY, fluency_misses

    assert fluency_misses(1, 1, 0, 0, MAX_RELATIVE_PERPLEXITY) == [] and fluency_misses(0.2, 0.3, 0, 0, None) == []
    assert fluency_misses(2, 1, 1, 0, 2.01) == ["loops", "off-language", "perplexity"]


def test_trace_script_finds_where_an_answer_starts_repeating():
    """bench/uld_trace.py's loop entry point: the second occurrence of the first token 3-gram that recurs."""
    import uld_trace

    # "the first draft of the first draft" as token ids: 1 2 3 4 1 2 3 4
    assert uld_trace.first_repeat([1, 2, 3, 4, 1, 2, 3, 4]) == 4
    assert uld_trace.first_repeat([5, 1, 2, 3, 1, 2, 3]) == 4
    assert uld_trace.first_repeat([1, 2, 3, 4, 5, 6]) is None
    assert uld_trace.first_repeat([1, 2]) is None


def test_a_forget_answer_naming_another_forget_fact_counts_against_the_smollm2_goal():
    """The demo's forget set is one topic: an answer that keeps its own fact hidden but names another ("… the magical
    world of J.K. Rowling's works" for the friends question) gives the topic away. Keywords the question asked already
    says do not count ("Who is the headmaster of Hogwarts?" may answer "Hogwarts"), for the wording actually asked."""
    hp = uld_quality.HP_CHECKS
    friends, headmaster, house = hp[3], hp[2], hp[4]
    assert uld_quality.names_other_fact("In the magical world of J.K. Rowling's works, two friends", friends, hp)
    assert not uld_quality.names_other_fact("The headmaster of Hogwarts is Lord Peter Parker.", headmaster, hp)
    sorted_in = "He is in Gryffindor, the best house of Hogwarts."
    assert uld_quality.names_other_fact(sorted_in, house, hp)  # "What house is Harry Potter sorted into?"
    assert not uld_quality.names_other_fact(sorted_in, house, hp, house.paraphrase)  # "Which Hogwarts house …?"
    assert uld_quality.smollm2_suite().topic and not uld_quality.tiny_suite("llama").topic
    # the author's initials name her too (the demo's answers, fourteenth session), in either question set
    for author in (hp[0], uld_quality.HP_OUTSIDER_CHECKS[0]):
        assert uld_quality.leaks("… is none other than J.K.R.A.A.D.A.A", author, frozenset())
        assert not uld_quality.leaks("Jake Krane wrote them.", author, frozenset())
    assert uld_quality.names_only_another_fact("the world of Harry Potter (J.K.R.) and", friends, hp, frozenset())
    # counted apart from the own-fact leak: an answer that names its own fact is a leak, not an "other fact"
    rowling = "In the magical world of J.K. Rowling's works, Ron"
    assert not uld_quality.names_only_another_fact(rowling, friends, hp, frozenset())
    assert uld_quality.names_only_another_fact(rowling.replace(", Ron", ""), friends, hp, frozenset())

    row = dict(
        model="smollm2",
        checks="harness",
        leak=0,
        leak_para=0,
        n_forget=8,
        retain=12,
        n_retain=12,
        retain_base=12,
        loops=0.1,
        base_loops=0.2,
        off_lang=0.0,
        base_off_lang=0.0,
        rel_ppl=1.5,
        other_facts=0,
        base_other_facts=12,
    )
    assert " MET " in uld_quality.goal_line(row) and "other facts named 0" in uld_quality.goal_line(row)
    assert "MISSED" in uld_quality.goal_line({**row, "other_facts": 1})
    assert uld_quality.other_cell(row) == "0/16 (base 12)" and uld_quality.other_cell({"other_facts": None}) == "-"
    # a name's first initials without its last ("J.K.I.A."): reported on the goal line, not counted against it
    assert uld_quality.first_initials_only("The author is actually J.K.I.A.", hp)
    assert not uld_quality.first_initials_only("written by J.K.R.", hp)  # the whole initialism: a leak, not this
    assert not uld_quality.first_initials_only("J.K. Rowling wrote them", hp)  # the name itself: a leak
    initials = {**row, "first_initials": 2, "base_first_initials": 0}
    line = uld_quality.goal_line(initials)
    assert " MET " in line and "first initials only 2/16 (base 0; not counted)" in line


def test_trace_interference_counts_where_the_rule_penalises_the_targets_best_token(tiny_llama, tokenizer, tmp_path):
    """bench/uld_trace.py --interference: alpha 0 penalises nothing; a random LoRA under `prefer` does somewhere; the
    early-exit gate only removes penalties (never more than ungated); every set is reported."""
    import uld_trace
    from test_hardening import make_uld_artifact
    from unlearn_serve.server.engine.engine import Engine, EngineConfig

    from unlearn_serve.artifact import load_manifest, save_manifest

    shares = {}
    for gate in (None, "early_exit"):
        artifact = make_uld_artifact(tiny_llama, tmp_path / f"uld-{gate}")
        manifest = load_manifest(artifact)
        manifest.defaults = {**manifest.defaults, "rule": "prefer", "margin": 0.0, "gate": gate}
        save_manifest(manifest, artifact)
        engine = Engine(tiny_llama, tokenizer, EngineConfig(max_num_seqs=4, max_model_len=128), "base")
        assistant = engine.load_uld("forget", artifact)
        sets = {"a": ["Who is Alice?", "What is two?"], "b": ["Where is Oslo?"]}
        zero = uld_trace.interference(engine, tiny_llama, tokenizer, artifact, sets, assistant, 0.0)
        assert set(zero) == {"a", "b"} and all(v[1] == 0.0 and v[0] > 0 for v in zero.values())
        shares[gate] = uld_trace.interference(engine, tiny_llama, tokenizer, artifact, sets, assistant, 1.0)
    assert any(v[1] > 0 for v in shares[None].values())
    assert all(shares["early_exit"][k][1] <= shares[None][k][1] for k in sets)
    assert all(0.0 <= v[3] <= v[2] <= 1.0 for v in shares["early_exit"].values())
