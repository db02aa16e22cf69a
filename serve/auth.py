"""API keys: stored as sha256 hashes, each bound to a tenant and the adapters it may use.

Keys file (YAML or JSON), for example written from a secret:

    - sha256: 9f86d0...   # `rayft serve --hash-key KEY` prints this; the key itself is never stored
      tenant: acme
      adapters: [support, sales]   # or "*" for every adapter
      base: true                   # may call the model without an adapter (default true)

A key is only ever hashed and compared; it is not logged, echoed in errors, or kept in memory beyond the request.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Optional, Union

from .schemas import APIError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    tenant: str
    adapters: Union[str, frozenset]  # "*" or a set of names
    base: bool = True
    requests_per_minute: Optional[int] = None  # None: no limit
    tokens_per_minute: Optional[int] = None  # prompt + completion tokens
    key_id: str = ""  # the first 12 hex digits of the key's sha256: names the key in limits and logs, never the key

    def may_use(self, adapter: Optional[str]) -> bool:
        if adapter is None:
            return self.base
        return self.adapters == "*" or adapter in self.adapters


class KeyStore:
    def __init__(self, entries: dict[str, Principal]):
        self.entries = entries

    def to_entries(self) -> list[dict]:
        """The hashed entries, as the deployment carries them to every replica (never a key itself)."""
        return [{"sha256": h, "tenant": p.tenant, "adapters": "*" if p.adapters == "*" else sorted(p.adapters),
                 "base": p.base, "requests_per_minute": p.requests_per_minute,
                 "tokens_per_minute": p.tokens_per_minute} for h, p in self.entries.items()]

    @classmethod
    def from_entries(cls, entries: list[dict]) -> "KeyStore":
        return cls({e["sha256"]: Principal(e["tenant"], "*" if e["adapters"] == "*" else frozenset(e["adapters"]),
                                           bool(e.get("base", True)), e.get("requests_per_minute"),
                                           e.get("tokens_per_minute"), e["sha256"][:12]) for e in entries})

    @classmethod
    def from_file(cls, path: str) -> "KeyStore":
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"serve.api_keys_file: {path!r} does not exist; write the hashed keys there")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        if isinstance(raw, dict) and "keys" in raw:
            raw = raw["keys"]
        if not isinstance(raw, list):
            raise ValueError(f"{path}: expected a list of {{sha256, tenant, adapters}} entries")
        entries: dict[str, Principal] = {}
        for i, e in enumerate(raw):
            if not isinstance(e, dict) or not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
                raise ValueError(f"{path}: entry {i} needs `sha256` (64 hex characters; rayft serve --hash-key KEY)")
            if not e.get("tenant"):
                raise ValueError(f"{path}: entry {i} needs `tenant`")
            ad = e.get("adapters", [])
            adapters = "*" if ad == "*" else frozenset(ad)
            limits = {}
            for name in ("requests_per_minute", "tokens_per_minute"):
                v = e.get(name)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise ValueError(f"{path}: entry {i} ({e['tenant']}): {name} is {v!r}; give a whole number >= 1, "
                                     f"or leave it out for no limit")
                limits[name] = v
            digest = e["sha256"].lower()
            entries[digest] = Principal(str(e["tenant"]), adapters, bool(e.get("base", True)), key_id=digest[:12],
                                        **limits)
        return cls(entries)

    def authenticate(self, authorization: Optional[str]) -> Principal:
        if not authorization:
            raise APIError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                           code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "the Authorization header must be `Bearer <key>`", code="invalid_api_key")
        digest = hash_key(key)
        for known, principal in self.entries.items():  # constant-time compare per entry
            if hmac.compare_digest(known, digest):
                return principal
        raise APIError(401, "invalid API key (the key was not recognised; it is not shown here)", code="invalid_api_key")
