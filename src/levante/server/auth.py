"""API keys: created once, shown once, stored as SHA-256 digests.

Keys look like `lv-<id>-<secret>`; the id is public (for listing and revoking), the
secret is never stored. When any key exists, every route except the health checks needs
one, as `Authorization: Bearer <key>`, `Api-Key: <key>` (Baseten/Truss style) or
`X-Api-Key: <key>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from levante.home import levante_home

PUBLIC_PATHS = frozenset({"/health", "/healthz", "/ping", "/api/version"})


@dataclass
class KeyRecord:
    id: str
    name: str
    digest: str
    created: float
    prefix: str  # first characters, to recognise a key in a list


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Hashed keys in a JSON file; re-read when the file changes, so `levante keys revoke` takes effect live."""

    def __init__(self, path: Path | None = None, extra_keys: list[str] | None = None) -> None:
        self.path = path or levante_home() / "keys.json"
        self._extra = {_digest(k) for k in (extra_keys or [])}
        self._records: list[KeyRecord] = []
        self._mtime: float | None = None

    def _load(self) -> list[KeyRecord]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._records, self._mtime = [], None
            return self._records
        if mtime != self._mtime:
            try:
                raw = json.loads(self.path.read_text())
                self._records = [KeyRecord(**r) for r in raw.get("keys", [])]
            except (OSError, ValueError, TypeError) as e:
                raise RuntimeError(f"{self.path}: unreadable key file ({e}); fix or remove it") from e
            self._mtime = mtime
        return self._records

    def _save(self, records: list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"keys": [asdict(r) for r in records]}, f, indent=2)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old or the new file
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._mtime = None

    @property
    def enabled(self) -> bool:
        return bool(self._extra or self._load())

    def verify(self, key: str) -> bool:
        digest = _digest(key)
        candidates = list(self._extra) + [r.digest for r in self._load()]
        # compare_digest on every candidate: timing does not reveal which prefix matched
        return any(hmac.compare_digest(digest, c) for c in candidates)

    def create(self, name: str = "") -> tuple[KeyRecord, str]:
        key_id = secrets.token_hex(4)
        key = f"lv-{key_id}-{secrets.token_urlsafe(24)}"
        record = KeyRecord(key_id, name, _digest(key), time.time(), key[:11])
        self._save([*self._load(), record])
        return record, key

    def list(self) -> list[KeyRecord]:
        return list(self._load())

    def revoke(self, key_id: str) -> bool:
        records = self._load()
        kept = [r for r in records if r.id != key_id and r.prefix != key_id]
        if len(kept) == len(records):
            return False
        self._save(kept)
        return True


def key_from_headers(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("bearer", "api-key") and value.strip():
        return value.strip()
    for name in ("api-key", "x-api-key"):
        if headers.get(name):
            return headers[name].strip()
    return None
