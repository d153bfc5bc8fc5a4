"""Tenants: who an API key belongs to, what that tenant may do, and its limits.

A key maps to a tenant (a name). Sources, all merged:

- ``--api-key NAME:KEY`` (repeatable) or ``FRAMEWISE_API_KEYS`` (comma list): a bare ``KEY`` (no ``NAME:``
  prefix that is a valid tenant name) is tenant ``default``, as before tenants existed;
- ``--api-keys-file PATH``: one key a line, ``NAME KEY`` or ``NAME sha256:<64 hex>`` (the SHA-256 of the key:
  the plaintext need not be stored), then optional ``key=value`` overrides of the tenant's limits
  (``rpm=600 concurrent=8 jobs=100 storage_mb=2048 retention_h=168 role=admin``); ``#`` starts a comment.
  Several lines may name one tenant (key rotation: every key works; overrides merge, the later line wins).
  The file is re-read when it changes (its mtime, size or inode, looked at most once a second, on a request)
  and on ``SIGHUP``; a file that does not parse is refused and the keys in force stay (an error is logged).

Authentication hashes the presented token (SHA-256 of its raw bytes) and compares it with **every** stored
digest with ``hmac.compare_digest``, no early exit. No keys at all (no ``--api-key``, no keys file):
development mode, every request is tenant ``default`` with the ``admin`` role and no limits, as before.

Names are ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``: they become parts of file paths and Redis keys, a log field
and a metric label (server/metrics.py labels only the configured names).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace

log = logging.getLogger("framewise.tenants")
MB = 1 << 20
DEFAULT = "default"
ROLES = ("user", "admin")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA = re.compile(r"sha256:([0-9a-fA-F]{64})")
RELOAD_CHECK_S = 1.0  # the keys file's mtime is looked at most this often
# overrides a keys-file line may carry -> the Limits field and its unit
_OVERRIDES = {"rpm": ("rpm", 1), "concurrent": ("concurrent", 1), "jobs": ("jobs", 1),
              "storage_mb": ("storage_bytes", MB), "retention_h": ("retention_s", 3600)}


@dataclass(frozen=True)
class Limits:
    """A tenant's limits; 0 is none. ``rpm``: requests per ``window_s``; ``concurrent``: POST requests in flight
    (chat completions, uploads, job submissions); ``jobs``: jobs queued or running; ``storage_bytes``: bytes of
    stored uploads; ``retention_s``: how long an upload is kept (its ``expires_at``)."""

    rpm: int = 0
    concurrent: int = 0
    jobs: int = 0
    storage_bytes: int = 0
    retention_s: int = 0
    window_s: int = 60

    @classmethod
    def from_settings(cls, s) -> Limits:
        return cls(rpm=int(s.tenant_rpm), concurrent=int(s.tenant_concurrent), jobs=int(s.tenant_jobs),
                   storage_bytes=int(s.tenant_storage_mb * MB), retention_s=int(s.tenant_retention_h * 3600),
                   window_s=max(1, int(s.rate_limit_window_s)))


UNLIMITED = Limits()


@dataclass(frozen=True)
class Tenant:
    name: str
    role: str = "user"
    limits: Limits = field(default=UNLIMITED)

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def scope(self) -> str | None:
        """The owner to filter by: None (every owner) for an admin, else the tenant's own name."""
        return None if self.admin else self.name


DEVELOPMENT = Tenant(DEFAULT, "admin", UNLIMITED)


class KeyFileError(ValueError):
    pass


def digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def split_key(item: str) -> tuple[str, str]:
    """``NAME:KEY`` -> (NAME, KEY) when NAME is a valid tenant name and KEY is not empty; else (default, item)."""
    name, sep, key = item.partition(":")
    if sep and key and NAME.fullmatch(name):
        return name, key
    return DEFAULT, item


def _key_digest(text: str) -> bytes:
    m = _SHA.fullmatch(text)
    return bytes.fromhex(m.group(1)) if m else digest(text.encode("utf-8"))


def parse_keys_file(text: str) -> tuple[list[tuple[bytes, str]], dict[str, dict]]:
    """(entries: (key digest, tenant name), overrides: name -> {Limits field or "role": value})."""
    entries: list[tuple[bytes, str]] = []
    overrides: dict[str, dict] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        words = line.split()
        if len(words) < 2:
            raise KeyFileError(f"line {n}: expected `NAME KEY [key=value ...]`")
        name, key, *rest = words
        if not NAME.fullmatch(name):
            raise KeyFileError(f"line {n}: {name!r} is not a tenant name ([A-Za-z0-9][A-Za-z0-9._-]{{0,63}})")
        if key.startswith("sha256:") and not _SHA.fullmatch(key):
            raise KeyFileError(f"line {n}: a hashed key is sha256: and 64 hex digits")
        entries.append((_key_digest(key), name))
        mine = overrides.setdefault(name, {})
        for word in rest:
            k, sep, v = word.partition("=")
            if not sep:
                raise KeyFileError(f"line {n}: {word!r} is not key=value")
            if k == "role":
                if v not in ROLES:
                    raise KeyFileError(f"line {n}: role must be one of {', '.join(ROLES)}")
                mine["role"] = v
            elif k in _OVERRIDES:
                attr, unit = _OVERRIDES[k]
                try:
                    value = float(v)
                except ValueError:
                    raise KeyFileError(f"line {n}: {k} must be a number") from None
                if value < 0:
                    raise KeyFileError(f"line {n}: {k} must be >= 0")
                mine[attr] = int(value * unit)
            else:
                raise KeyFileError(f"line {n}: unknown setting {k!r} (known: role, {', '.join(_OVERRIDES)})")
    return entries, overrides


class KeyRing:
    """The keys in force and their tenants (see the module doc). Thread-safe: a reload swaps one tuple."""

    def __init__(self, settings):
        self.path = getattr(settings, "api_keys_file", None) or None
        self.defaults = Limits.from_settings(settings) if hasattr(settings, "tenant_rpm") else UNLIMITED
        self.admins = set(getattr(settings, "admin_tenants", None) or ())
        self._static = [(digest(key.encode("utf-8")), name) for name, key in
                        (split_key(item) for item in (getattr(settings, "api_keys", None) or ()))]
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._next_check = 0.0
        self._state: tuple[list[tuple[bytes, str]], dict[str, Tenant]] = ([], {})
        self.reloads = 0
        self.load(strict=True)

    @property
    def enabled(self) -> bool:
        """Keys are configured (a keys file counts even while empty: nobody gets in)."""
        return bool(self._static) or self.path is not None

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._state[1]) if self.enabled else frozenset({DEFAULT})

    def tenant(self, name: str) -> Tenant | None:
        return self._state[1].get(name) if self.enabled else DEVELOPMENT

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def load(self, strict: bool = False) -> bool:
        """(Re)build from the settings and the keys file; True when the keys in force changed. A file that does
        not parse or cannot be read: raised when ``strict`` (at startup), else logged and the old keys kept."""
        with self._lock:
            entries, overrides = list(self._static), {}
            stamp = None
            if self.path is not None:
                stamp = self._stat()
                try:
                    with open(self.path, encoding="utf-8") as f:
                        file_entries, overrides = parse_keys_file(f.read())
                except (OSError, UnicodeDecodeError, KeyFileError) as e:
                    if strict:
                        raise KeyFileError(f"{self.path}: {e}") from None
                    log.error("keys file %s refused, the keys in force stay: %s", self.path, e)
                    self._stamp = stamp
                    return False
                entries += file_entries
            tenants = {}
            for _, name in entries:
                if name not in tenants:
                    o = overrides.get(name, {})
                    role = o.get("role", "admin" if name in self.admins else "user")
                    limits = replace(self.defaults, **{k: v for k, v in o.items() if k != "role"})
                    tenants[name] = Tenant(name, role, limits)
            self._state, self._stamp = (entries, tenants), stamp
            self.reloads += 1
        if self.path is not None:
            log.info("keys loaded: %d keys, %d tenants", len(entries), len(tenants),
                     extra={"tenants": sorted(tenants)})
        return True

    def maybe_reload(self) -> None:
        """Re-read the keys file if it changed (looked at most every :data:`RELOAD_CHECK_S`)."""
        if self.path is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + RELOAD_CHECK_S
        if self._stat() != self._stamp:
            self.load()

    def authenticate(self, token: bytes | None) -> Tenant | None:
        """The tenant whose key ``token`` is (raw bytes, never decoded), or None. Development mode: everyone is
        :data:`DEVELOPMENT`."""
        if not self.enabled:
            return DEVELOPMENT
        self.maybe_reload()
        entries, tenants = self._state
        if token is None:
            return None
        presented = digest(token)
        found = None
        for stored, name in entries:  # every digest is compared: no early exit
            if hmac.compare_digest(presented, stored):
                found = name
        return tenants.get(found) if found is not None else None

    def label(self, name: str | None) -> str:
        """A metric label: the name of a configured tenant, else ``other`` (bounded, never a key)."""
        return name if name is not None and name in self.names else "other"
