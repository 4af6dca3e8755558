"""`unlearn-serve serve`: load a model (and unlearning artifacts) and serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import logging
import os
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local directory of the target model")
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load (dequantized; needs the gguf extra)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--device-map", default=None, help="'auto' shards the model over the host's GPUs with accelerate"
    )
    parser.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    parser.add_argument("--served-model-name", help="name clients use as `model` (default: --model as given)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's, at most 4096)")
    parser.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, help="waiting sequences beyond which requests get 503")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key", action="append", default=[], help="accepted API key (repeatable; also UNLEARN_API_KEY)"
    )
    parser.add_argument("--uld", action="append", default=[], metavar="NAME=DIR", help="load a ULD assistant")
    parser.add_argument("--uoe", action="append", default=[], metavar="NAME=DIR", help="load a UOE expert patch")
    parser.add_argument(
        "--artifact-root", help="/v1/unlearning/load accepts only paths under this directory (default: cwd)"
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 400 (default 4 MiB)"
    )
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    parser.add_argument("--log-level", default="info")


def parse_named(values: list[str], flag: str) -> list[tuple[str, str]]:
    from unlearn_serve.cli import CliError

    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise CliError(f"{flag} {value!r}: expected NAME=DIR")
        pairs.append((name, path))
    return pairs


def build_engine(args: argparse.Namespace):
    """Load the model and the artifacts named on the command line (errors are user errors)."""
    from unlearn_serve.loading import load_model_and_tokenizer
    from unlearn_serve.server.engine.engine import Engine, EngineConfig

    model, tokenizer = load_model_and_tokenizer(
        args.model,
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        device_map=args.device_map,
    )
    config = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, max_prefill_tokens=args.max_prefill_tokens
    )
    engine = Engine(model, tokenizer, config, model_name=args.served_model_name or args.model)
    for name, path in parse_named(args.uld, "--uld"):
        engine.load_uld(name, path)
    for name, path in parse_named(args.uoe, "--uoe"):
        engine.load_uoe(name, path)
    return engine


def check_limits(args: argparse.Namespace) -> None:
    from unlearn_serve.cli import CliError

    if args.max_queue is not None and args.max_queue < 0:
        raise CliError(f"--max-queue {args.max_queue}: must be 0 or more")
    if args.max_body_bytes < 1024:
        raise CliError(f"--max-body-bytes {args.max_body_bytes}: must be at least 1024")
    if args.drain_timeout < 0:
        raise CliError(f"--drain-timeout {args.drain_timeout}: must be 0 or more seconds")


def run(args: argparse.Namespace) -> int:
    check_limits(args)  # before the heavy imports: a bad flag fails fast
    from unlearn_serve.server.app import build_app
    from unlearn_serve.server.config import ServerConfig
    from unlearn_serve.server.draining import draining_server

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parse_named(args.uld, "--uld")
    parse_named(args.uoe, "--uoe")
    keys = list(args.api_key)
    if os.environ.get("UNLEARN_API_KEY"):
        keys.append(os.environ["UNLEARN_API_KEY"])
    config = ServerConfig(
        served_model_name=args.served_model_name or args.model,
        api_keys=keys,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        artifact_root=args.artifact_root,
        drain_timeout_s=args.drain_timeout,
    )
    # Load before listening: a bad model or artifact stops start-up with a clear message (exit 2).
    started = time.monotonic()
    engine = build_engine(args)
    logging.getLogger("unlearn_serve").info(
        "loaded %s in %.1fs (artifacts: %s)", config.served_model_name, time.monotonic() - started,
        ", ".join(engine.artifact_names()) or "none",
    )
    app = build_app(config, engine=engine)
    # SIGTERM drains (see server.draining): /ready 503, in-flight requests finish, exit 0.
    draining_server(app, args.host, args.port, args.log_level, args.drain_timeout).run()
    return 0
