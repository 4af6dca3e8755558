"""`unlearn-serve serve`: load a model (and unlearning artifacts) and serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import stat
import time
from pathlib import Path


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
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=32,
        help="sequences decoded together (at most: a KV budget may hold fewer)",
    )
    parser.add_argument("--max-queue", type=int, help="waiting sequences beyond which requests get 503")
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument(
        "--assistant-kv-layers",
        type=int,
        help="layers of KV reserved for ULD assistants loaded at run time (default: a quarter of the model's "
        "layers, or the deepest --uld assistant)",
    )
    parser.add_argument(
        "--kv-cache-memory",
        metavar="SIZE",
        help="KV cache budget, e.g. 8GiB (bytes, or K/M/G/T[iB]); it sets how many sequences run at once (at "
        "most --max-num-seqs). Default on CPU: room for --max-num-seqs; on CUDA: --gpu-memory-utilization",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: share of the GPU's memory for weights + activations + KV cache (default 0.9)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="CUDA: run every decode step eagerly, without CUDA graphs (on CPU the engine always runs eager)",
    )
    parser.add_argument(
        "--async-output",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="process each decode step's tokens (detokenise, stop rules, stream) while the next step runs on the "
        "device (default: on with CUDA, off on CPU; --no-async-output turns it off)",
    )
    parser.add_argument(
        "--no-repeat-substitution",
        type=int,
        metavar="N",
        help="where unlearning replaces the model's own next token, never with one that repeats an N-gram of the "
        "answer (0 = off; default: the engine's, 3; docs/uld.md)",
    )
    parser.add_argument(
        "--repeat-guard-scope",
        choices=("answer", "substitutions"),
        default="answer",
        help="where the repeat guard acts: every position of an answer from the first one the unlearning changed "
        "(answer, the default) or only the changed positions (substitutions); docs/uld.md",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a full-access API key: every model, admin routes, may weaken unlearning (repeatable; also "
        "UNLEARN_API_KEY)",
    )
    parser.add_argument(
        "--api-keys",
        metavar="FILE",
        help="JSON/YAML key file: per-key models, admin, can_weaken (see docs/security.md); SIGHUP reloads it",
    )
    parser.add_argument("--audit-log", metavar="FILE", help="append one JSON line per /v1 request (no text)")
    parser.add_argument(
        "--audit-log-max-bytes",
        type=int,
        default=100 * 1024 * 1024,
        help="rotate the audit log at this size, keeping 5 old files (0: never; for logrotate copytruncate)",
    )
    parser.add_argument(
        "--chat-template-timeout", type=float, default=5.0, help="seconds a chat template may take to render (400)"
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


def build_engine(args: argparse.Namespace):
    """Load the model and the artifacts named on the command line (errors are user errors)."""
    from unlearn_serve.cli import parse_named_dirs
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
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_prefill_tokens=args.max_prefill_tokens,
        assistant_kv_layers=args.assistant_kv_layers,
        kv_cache_memory=kv_cache_bytes(args),
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        async_output=args.async_output,
        no_repeat_substitution=args.no_repeat_substitution,
        repeat_guard_after_substitution=args.repeat_guard_scope == "answer",
    )
    engine = Engine(model, tokenizer, config, model_name=args.served_model_name or args.model)
    for name, path in parse_named_dirs(args.uld, "--uld"):
        engine.load_uld(name, path)
    for name, path in parse_named_dirs(args.uoe, "--uoe"):
        engine.load_uoe(name, path)
    engine.allocate_kv()  # the whole KV cache, before listening (the --uld assistants may have deepened it)
    from unlearn_serve.server.engine.kv_budget import fmt

    logging.getLogger("unlearn_serve").info(
        "KV cache: %s, %d sequences of up to %d tokens at once",
        fmt(engine.runner.cache.nbytes()),
        engine.num_slots,
        engine.max_model_len,
    )
    return engine


def kv_cache_bytes(args: argparse.Namespace) -> int | None:
    from unlearn_serve.cli import CliError
    from unlearn_serve.server.engine.kv_budget import parse_memory

    if args.kv_cache_memory is None:
        return None
    try:
        return parse_memory(args.kv_cache_memory)
    except ValueError as exc:
        raise CliError(f"--kv-cache-memory: {exc}") from None


def check_limits(args: argparse.Namespace) -> None:
    from unlearn_serve.cli import CliError

    if args.max_queue is not None and args.max_queue < 0:
        raise CliError(f"--max-queue {args.max_queue}: must be 0 or more")
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: must be in 0..65535")
    levels = ("critical", "error", "warning", "info", "debug")  # what both logging and uvicorn accept
    if args.log_level.lower() not in levels:
        raise CliError(f"--log-level {args.log_level}: choose one of {', '.join(levels)}")
    args.log_level = args.log_level.lower()
    for flag, value in (
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-model-len", args.max_model_len),
        ("--max-prefill-tokens", args.max_prefill_tokens),
    ):
        if value is not None and value < 1:
            raise CliError(f"{flag} {value}: must be 1 or more")
    if args.no_repeat_substitution is not None and args.no_repeat_substitution < 0:
        raise CliError(f"--no-repeat-substitution {args.no_repeat_substitution}: must be 0 (off) or more")
    if args.assistant_kv_layers is not None and args.assistant_kv_layers < 0:
        raise CliError(f"--assistant-kv-layers {args.assistant_kv_layers}: must be 0 or more")
    if args.max_body_bytes < 1024:
        raise CliError(f"--max-body-bytes {args.max_body_bytes}: must be at least 1024")
    if args.drain_timeout < 0:
        raise CliError(f"--drain-timeout {args.drain_timeout}: must be 0 or more seconds")
    if args.audit_log_max_bytes < 0:
        raise CliError(f"--audit-log-max-bytes {args.audit_log_max_bytes}: must be 0 or more")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise CliError(f"--gpu-memory-utilization {args.gpu_memory_utilization}: must be in (0, 1]")
    kv_cache_bytes(args)
    if not args.chat_template_timeout > 0:
        raise CliError(f"--chat-template-timeout {args.chat_template_timeout}: must be more than 0 seconds")
    if args.artifact_root is not None and not Path(args.artifact_root).is_dir():  # a typo showed only on a load
        raise CliError(f"--artifact-root {args.artifact_root}: not a directory")


def served_names(args: argparse.Namespace) -> list[str]:
    """The names clients may ask for: the base model and every artifact named on the command line."""
    from unlearn_serve.cli import parse_named_dirs

    names = [args.served_model_name or args.model]
    names += [name for name, _ in parse_named_dirs(args.uld, "--uld") + parse_named_dirs(args.uoe, "--uoe")]
    return names


def load_key_file(path: str, served: list[str]):
    """Parse and check --api-keys before anything heavy loads (errors: one line naming the entry)."""
    from unlearn_serve.server.policy import AccessPolicy

    policy = AccessPolicy.from_file(path)
    policy.check_models(served)
    if policy.has_plain_keys:
        try:
            mode = Path(path).stat().st_mode
        except OSError:
            mode = 0
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logging.getLogger("unlearn_serve").warning(
                "%s holds plain keys and is readable by group/others (mode %o): chmod 600 it, or store key_sha256",
                path,
                stat.S_IMODE(mode),
            )
    return policy


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def install_key_reload(state, path: str) -> None:
    """SIGHUP re-reads the key file; a bad file is logged and the keys in force stay."""
    log = logging.getLogger("unlearn_serve")

    def reload(signum, frame) -> None:
        engine = state.serving.engine if state.serving is not None else None
        served = [state.config.served_model_name] + (engine.artifact_names() if engine is not None else [])
        try:
            from unlearn_serve.server.policy import AccessPolicy

            state.policy = AccessPolicy.from_keys(state.config.api_keys).merged(load_key_file(path, served))
        except Exception as exc:  # keep serving with the old keys
            log.error("SIGHUP: key file not reloaded: %s", exc)
            return
        log.info("SIGHUP: reloaded %d key(s) from %s", len(state.policy.entries), path)

    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, reload)


def run(args: argparse.Namespace) -> int:
    from unlearn_serve.cli import CliError

    check_limits(args)  # before the heavy imports: a bad flag fails fast
    from unlearn_serve.server.app import build_app
    from unlearn_serve.server.audit import AuditConfig
    from unlearn_serve.server.config import ServerConfig
    from unlearn_serve.server.draining import draining_server

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    served = served_names(args)
    keys = list(args.api_key)
    if os.environ.get("UNLEARN_API_KEY"):
        keys.append(os.environ["UNLEARN_API_KEY"])
    key_policy = load_key_file(args.api_keys, served) if args.api_keys else None
    audit = None
    if args.audit_log:
        audit = AuditConfig(args.audit_log, max_bytes=args.audit_log_max_bytes)
        try:  # fail at start-up, not on the first request
            with open(args.audit_log, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise CliError(f"--audit-log {args.audit_log}: cannot open for appending ({exc.strerror})") from None
    config = ServerConfig(
        served_model_name=args.served_model_name or args.model,
        api_keys=keys,
        key_policy=key_policy,
        audit=audit,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        artifact_root=args.artifact_root,
        drain_timeout_s=args.drain_timeout,
        chat_template_timeout_s=args.chat_template_timeout,
    )
    policy = config.access_policy()  # a key in both a flag and the file is refused here
    if policy.open and not is_loopback(args.host):
        logging.getLogger("unlearn_serve").warning(
            "no API keys: anyone who can reach %s:%d may use every model, weaken unlearning and load/unload "
            "artifacts (use --api-keys FILE)",
            args.host,
            args.port,
        )
    # Load before listening: a bad model or artifact stops start-up with a clear message (exit 2).
    started = time.monotonic()
    engine = build_engine(args)
    logging.getLogger("unlearn_serve").info(
        "loaded %s in %.1fs (artifacts: %s)",
        config.served_model_name,
        time.monotonic() - started,
        ", ".join(engine.artifact_names()) or "none",
    )
    app = build_app(config, engine=engine)
    if args.api_keys:
        install_key_reload(app.state.server, args.api_keys)
    # SIGTERM drains (see server.draining): /ready 503, in-flight requests finish, exit 0.
    draining_server(app, args.host, args.port, args.log_level, args.drain_timeout).run()
    return 0
