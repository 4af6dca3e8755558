"""Server settings (HTTP side); model/engine settings live in EngineConfig and the load options."""

from __future__ import annotations

from dataclasses import dataclass, field

from unlearn_serve.server.audit import AuditConfig
from unlearn_serve.server.policy import AccessPolicy


@dataclass
class ServerConfig:
    served_model_name: str
    api_keys: list[str] = field(default_factory=list)  # full-access keys (--api-key, UNLEARN_API_KEY)
    key_policy: AccessPolicy | None = None  # per-key access (--api-keys FILE); combined with api_keys
    audit: AuditConfig | None = None  # --audit-log FILE
    max_queue: int | None = None  # waiting sequences beyond which new requests get 503
    max_body_bytes: int = 4 * 1024 * 1024
    artifact_root: str | None = None  # /v1/unlearning/load only accepts paths under this directory
    drain_timeout_s: float = 30.0
    chat_template_timeout_s: float = 5.0  # a chat template render that runs longer gets 400

    def access_policy(self) -> AccessPolicy:
        """The keys in force: the full-access flags plus the key file's entries (open when both are empty)."""
        flags = AccessPolicy.from_keys(self.api_keys)
        return flags.merged(self.key_policy) if self.key_policy is not None else flags
