"""Server settings (HTTP side); model/engine settings live in EngineConfig and the load options."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    served_model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_queue: int | None = None  # waiting sequences beyond which new requests get 503
    max_body_bytes: int = 4 * 1024 * 1024
    artifact_root: str | None = None  # /v1/unlearning/load only accepts paths under this directory
    drain_timeout_s: float = 30.0
