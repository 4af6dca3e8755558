"""Who may do what: the API-key file (`serve --api-keys FILE`) and the decisions made from it.

A key file is JSON (or YAML):

    {"keys": [
      {"name": "support-bot", "key": "sk-...", "models": ["forget-hp"]},
      {"name": "ops", "key_sha256": "<hex sha256 of the key>", "models": ["*"], "admin": true, "can_weaken": true}
    ]}

Keys are held only as SHA-256 digests and compared with `hmac.compare_digest` against every entry, so
neither timing nor an early exit tells a caller which key (or prefix) was close. `--api-key K` flags are
entries with full access (every model, admin, can_weaken). With no keys at all the server is open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from unlearn_serve.errors import ConfigError

ALL_MODELS = "*"
_FIELDS = {"name", "key", "key_sha256", "models", "admin", "can_weaken"}
_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")  # also a metrics label value: short and plain
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
MIN_KEY_CHARS = 8


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyEntry:
    """One caller: a name (logged, a metrics label), the key's digest and what it may do."""

    name: str
    digest: bytes = field(repr=False)
    models: frozenset[str] = frozenset({ALL_MODELS})
    admin: bool = False
    can_weaken: bool = False

    def allows(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


# The caller of an open server (no keys configured): it may do everything.
OPEN_ACCESS = KeyEntry(name="", digest=b"", admin=True, can_weaken=True)


class PolicyViolation(Exception):
    """A request the caller's key does not allow (403 `permission_denied`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class AccessPolicy:
    """The configured keys. `open` (no keys) means every caller has full access."""

    entries: list[KeyEntry] = field(default_factory=list)
    source: str | None = None  # the key file, for messages
    has_plain_keys: bool = False  # the file itself holds secrets (start-up warns if others can read it)

    @property
    def open(self) -> bool:
        return not self.entries

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> AccessPolicy:
        """`--api-key` flags / UNLEARN_API_KEY: each is a full-access entry named api-key-N."""
        entries = [
            KeyEntry(f"api-key-{i}", key_digest(k), admin=True, can_weaken=True) for i, k in enumerate(keys, 1)
        ]
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | Path) -> AccessPolicy:
        """Parse a key file; any problem is a ConfigError naming the file and the entry."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the key file ({exc.__class__.__name__})") from None
        data = _parse(text, path)
        if not isinstance(data, dict) or set(data) != {"keys"} or not isinstance(data["keys"], list):
            raise ConfigError(f'{path}: expected an object {{"keys": [...]}} and nothing else')
        entries: list[KeyEntry] = []
        plain = False
        names: set[str] = set()
        digests: set[bytes] = set()
        for i, raw in enumerate(data["keys"]):
            entry, is_plain = _entry(raw, f"{path}: keys[{i}]")
            where = f"{path}: keys[{i}] ({entry.name!r})"
            if entry.name in names:
                raise ConfigError(f"{where}: duplicate name")
            if entry.digest in digests:
                raise ConfigError(f"{where}: the same key as an earlier entry")
            names.add(entry.name)
            digests.add(entry.digest)
            entries.append(entry)
            plain |= is_plain
        if not entries:
            raise ConfigError(f"{path}: no keys (an empty key file would leave the server open)")
        return cls(entries, str(path), plain)

    def merged(self, other: AccessPolicy) -> AccessPolicy:
        """Both sets of entries (flags and file); names and keys must stay unique."""
        names = {e.name for e in self.entries}
        digests = {e.digest for e in self.entries}
        for e in other.entries:
            if e.name in names:
                raise ConfigError(f"{other.source or 'keys'}: entry {e.name!r} clashes with a --api-key name")
            if e.digest in digests:
                raise ConfigError(f"{other.source or 'keys'}: entry {e.name!r} has the same key as a --api-key flag")
        return AccessPolicy(self.entries + other.entries, other.source or self.source,
                            self.has_plain_keys or other.has_plain_keys)

    def check_models(self, served: Iterable[str]) -> None:
        """Every model a key names must be served (a typo would otherwise silently lock a caller out)."""
        served = set(served)
        for e in self.entries:
            for model in sorted(e.models - {ALL_MODELS}):
                if model not in served:
                    raise ConfigError(
                        f"{self.source or 'keys'}: entry {e.name!r}: model {model!r} is not served "
                        f"(served: {', '.join(sorted(served))})"
                    )

    def authenticate(self, token: str) -> KeyEntry | None:
        """The entry whose key is `token`, or None. Every entry is compared (constant time per entry)."""
        if self.open:
            return OPEN_ACCESS
        digest = key_digest(token)
        found = None
        for e in self.entries:
            if hmac.compare_digest(digest, e.digest):
                found = e
        return found


def check_unlearning(
    key: KeyEntry, model: str, options: dict[str, float], default_alpha: float, default_filter: float
) -> None:
    """A request may only make a ULD artifact's unlearning at least as strong as its serving defaults
    (alpha >= default, filter <= default) unless its key may weaken it. Validity (finite, alpha >= 0,
    filter in [0, 1]) is checked for everybody before this, by the request model."""
    if key.can_weaken:
        return
    alpha = options.get("alpha")
    if alpha is not None and not (math.isfinite(alpha) and alpha >= default_alpha):
        raise PolicyViolation(
            f"unlearning.alpha below {default_alpha:g} (the serving default of `{model}`) would weaken "
            "unlearning; this API key may not do that",
            "unlearning.alpha",
        )
    filt = options.get("filter")
    if filt is not None and not (math.isfinite(filt) and filt <= default_filter):
        raise PolicyViolation(
            f"unlearning.filter above {default_filter:g} (the serving default of `{model}`) would weaken "
            "unlearning; this API key may not do that",
            "unlearning.filter",
        )


def _parse(text: str, path: Path):
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}") from None


def _entry(raw, where: str) -> tuple[KeyEntry, bool]:
    """One key entry; the bool says whether it held the key in plain text."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object")
    name = raw.get("name")
    if isinstance(name, str):
        where = f"{where} ({name!r})"
    unknown = sorted(set(raw) - _FIELDS, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(_FIELDS))})")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: 'name' must be 1-64 characters of letters, digits and . _ : @ -")
    if ("key" in raw) == ("key_sha256" in raw):
        raise ConfigError(f"{where}: give exactly one of 'key' and 'key_sha256'")
    if "key" in raw:
        key = raw["key"]
        if not isinstance(key, str) or len(key) < MIN_KEY_CHARS or key != key.strip():
            raise ConfigError(f"{where}: 'key' must be a string of at least {MIN_KEY_CHARS} characters, no edge spaces")
        digest = key_digest(key)
    else:
        hexed = raw["key_sha256"]
        if not isinstance(hexed, str) or not _HEX64.match(hexed):
            raise ConfigError(f"{where}: 'key_sha256' must be 64 hex digits (sha256 of the key)")
        digest = bytes.fromhex(hexed)
    models = raw.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{where}: 'models' must be a non-empty list of served model names (or [\"*\"])")
    flags = {}
    for flag in ("admin", "can_weaken"):
        value = raw.get(flag, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {flag!r} must be true or false")
        flags[flag] = value
    return KeyEntry(name, digest, frozenset(models), **flags), "key" in raw
