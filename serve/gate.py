"""What rayft checks in front of every engine, before a request reaches a model: API keys, the tenant's adapters, the
access policy with its audit line, the model name -> (version, adapter) route with its A/B draw, and the replica's
limit on requests in flight. Both ingresses (the vllm one in serve/ingress.py and the hf one in serve/app.py) hold one
Gate, so the two engines answer the same 401/403/404/503s.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import deque
from typing import Optional

from .config import LOOPBACK_HOSTS, ServeConfig
from .schemas import APIError

access_log = logging.getLogger("rayft.access")
VERSION_HEADER = "x-rayft-model-version"
DEFAULT_VERSION = "default"


def load_keys(cfg: ServeConfig) -> Optional[list[dict]]:
    """The hashed API keys from serve.api_keys_file or RAYFT_API_KEYS_FILE, read where `rayft serve` runs; None when
    neither is set."""
    from .auth import KeyStore

    path = cfg.api_keys_file or os.environ.get("RAYFT_API_KEYS_FILE")
    return KeyStore.from_file(path).to_entries() if path else None


def served_name(cfg: ServeConfig, model_path: str) -> str:
    return cfg.model_name or os.path.basename(os.path.normpath(model_path)) or "model"


class Gate:
    def __init__(self, cfg: ServeConfig, name: str, catalogue: dict[str, str], security_cfg: Optional[dict] = None,
                 submitted_by: Optional[str] = None, capacity: Optional[int] = None,
                 keys: Optional[list[dict]] = None):
        from rayft.security.access import AuditLog, load_policy
        from rayft.security.config import SecurityConfig

        from .auth import KeyStore

        self.cfg, self.name, self.catalogue = cfg, name, catalogue
        self.ab = cfg.ab_split
        # Resolved by the driver (build_app): the policy and audit paths do not depend on the replica's environment.
        self.security = SecurityConfig.model_validate(security_cfg or {})
        self.policy = load_policy(self.security.policy_file) if self.security.policy_file else None
        # `submitted_by`: who submitted the job that deployed this app (rayft submit), recorded in every audit line.
        self.audit = AuditLog(self.security.audit_log, submitted_by) if self.security.audit_log else None
        # The keys (their hashes) travel with the deployment (read by the driver, load_keys): a replica never depends
        # on its node having the file or RAYFT_API_KEYS_FILE, and never serves a public address without them.
        self.keys = KeyStore.from_entries(keys) if keys is not None else None
        if self.keys is None and (cfg.require_api_keys or cfg.host not in LOOPBACK_HOSTS):
            raise ValueError(f"refusing to serve on {cfg.host!r} without API keys (serve.require_api_keys is "
                             f"{cfg.require_api_keys}); set serve.api_keys_file (or RAYFT_API_KEYS_FILE) where "
                             f"`rayft serve` runs")
        self.rng = random.Random(cfg.seed)
        self.inflight = 0
        self.capacity = capacity or cfg.max_ongoing_requests
        self.limits = RateLimits()
        self.usage = Usage()

    # -- who ----------------------------------------------------------------------------------------------
    def auth(self, authorization: Optional[str]):
        """The caller's principal (401 without a valid key when keys are on); None when keys are off."""
        if self.keys is None:
            return None
        return self.keys.authenticate(authorization)

    def admit(self, authorization: Optional[str], path: str):
        """auth() for an inference route: a refusal is audited before it is raised."""
        try:
            return self.auth(authorization)
        except APIError as e:
            self.record_infer(False, None, path, f"HTTP {e.status}: {e.code}")
            raise

    # -- what ---------------------------------------------------------------------------------------------
    def route(self, model: str, user: Optional[str] = None) -> tuple[str, Optional[str]]:
        """`model` -> (version, adapter). Unknown names are 404s; never a fallback to the base.

        An A/B name draws a version by weight; a request with OpenAI's `user` field always gets the same version
        for that user (a hash of the user and the split's name picks the point in the weights), so a conversation
        stays on one version."""
        if self.ab and model == self.ab.name:
            versions = self.ab.versions
            total = sum(v.weight for v in versions)
            if user:
                import hashlib

                digest = hashlib.sha256(f"{self.ab.name}\0{user}".encode()).digest()
                point = int.from_bytes(digest[:8], "big") / 2**64 * total
            else:
                point = self.rng.random() * total
            for v in versions:
                point -= v.weight
                if point < 0:
                    return v.label, None
            return versions[-1].label, None
        if model == self.name:
            return DEFAULT_VERSION, None
        base, sep, adapter = model.partition(":")
        if sep and base == self.name:
            if adapter in self.catalogue:
                return DEFAULT_VERSION, adapter
            known = ", ".join(sorted(self.catalogue)) or "none"
            raise APIError(404, f"model {model!r}: adapter {adapter!r} is not served by this endpoint (known adapters: "
                           f"{known}); GET /v1/models lists them", param="model", code="model_not_found")
        served = [self.name] + ([self.ab.name] if self.ab else [])
        raise APIError(404, f"model {model!r} is not served here (served: {', '.join(served)}, or "
                       f"'{self.name}:<adapter>'); GET /v1/models lists them", param="model", code="model_not_found")

    def models(self, who) -> dict:
        created = int(time.time())
        data = [{"id": self.name, "object": "model", "created": created, "owned_by": "rayft", "parent": None}]
        for name in sorted(self.catalogue):
            if who is None or who.may_use(name):
                data.append({"id": f"{self.name}:{name}", "object": "model", "created": created,
                             "owned_by": "rayft", "parent": self.name})
        if self.ab:
            data.append({"id": self.ab.name, "object": "model", "created": created, "owned_by": "rayft",
                         "parent": None, "versions": {v.label: v.weight for v in self.ab.versions}})
        return {"object": "list", "data": data}

    # -- may they -----------------------------------------------------------------------------------------
    def check_infer(self, who, target: str, adapter: Optional[str]) -> None:
        """The access decision of one inference request (the key's adapters, then the policy's role for its
        tenant): one audit line, allowed or denied, then a 403 when denied."""
        from rayft.security.access import decide

        tenant = who.tenant if who is not None else "anonymous"  # no keys: loopback only
        if who is not None and not who.may_use(adapter):
            self.record_infer(False, tenant, target, "the API key is not bound to this adapter")
            what = f"adapter {adapter!r}" if adapter else f"model {self.name!r} without an adapter"
            raise APIError(403, f"this API key (tenant {who.tenant!r}) may not use {what}; ask for access or use "
                           f"one of its adapters", param="model", code="adapter_not_allowed")
        if self.policy is None and self.audit is None:
            return
        decision = decide(self.policy, tenant, "infer", target, kind="tenant")
        if self.audit is not None:
            self.audit.record(decision, "server")
        if not decision.allowed:
            raise APIError(403, f"tenant {tenant!r} (role {decision.role or 'none'}) may not run inference on this "
                           f"endpoint under its access policy; ask the endpoint's admin to give the tenant a role that "
                           f"allows `infer`", param="model", code="action_not_allowed")

    def record_infer(self, allowed: bool, tenant: Optional[str], target: str, reason: str) -> None:
        """Audit a decision made before the policy (authentication, key bindings). Never the key itself."""
        if self.audit is None:
            return
        from rayft.security.access import Decision

        policy = self.policy.path if self.policy else None
        role = self.policy.role_of(tenant, "tenant") if (self.policy and tenant) else None
        self.audit.record(Decision(allowed, tenant or "-", "tenant", role, "infer", target, reason, policy), "server")

    # -- how many -----------------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """503 with Retry-After when the replicas behind this gate already hold serve.max_ongoing_requests
        requests each."""
        if self.inflight >= self.capacity:
            raise APIError(503, f"the server is at serve.max_ongoing_requests={self.cfg.max_ongoing_requests} per "
                           f"replica; retry after {self.cfg.retry_after_s} s", code="overloaded",
                           headers={"Retry-After": str(self.cfg.retry_after_s)})

    # -- limits and usage ---------------------------------------------------------------------------------
    def check_rate(self, who) -> None:
        """429 with Retry-After when the key is over its requests or tokens per minute (keys without limits pass)."""
        if who is None:
            return
        wait_s = self.limits.admit(who)
        if wait_s is not None:
            self.usage.count(who.tenant, rate_limited=True)
            raise APIError(429, f"rate limit of this API key (tenant {who.tenant!r}) reached: "
                           f"{who.requests_per_minute or '-'} requests and {who.tokens_per_minute or '-'} tokens per "
                           f"minute; retry after {wait_s} s", code="rate_limit_exceeded",
                           headers={"Retry-After": str(wait_s)})

    def finish(self, who, request_id: str, path: str, model: str, version: Optional[str], adapter: Optional[str],
               status: int, prompt_tokens: int, completion_tokens: int, started: float) -> None:
        """After a request: its tokens count against the key's limit and the tenant's usage, and one JSON access-log
        line is written (no prompt or answer text, never a key)."""
        tenant = who.tenant if who is not None else "anonymous"
        if who is not None:
            self.limits.spend(who, prompt_tokens + completion_tokens)
        self.usage.count(tenant, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         error=status >= 400)
        access_log.info(json.dumps({
            "ts": round(time.time(), 3), "request_id": request_id, "path": path, "tenant": tenant,
            "key_id": who.key_id if who is not None else None, "model": model, "version": version,
            "adapter": adapter, "status": status, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "latency_ms": round((time.perf_counter() - started) * 1e3, 1)}))


class RateLimits:
    """Per-key sliding one-minute windows of requests and tokens, kept by this replica's gate (the vllm engine's
    ingress admits for all its engine replicas; on the hf engine each replica counts its own)."""

    WINDOW_S = 60.0

    def __init__(self):
        self.requests: dict[str, deque] = {}
        self.tokens: dict[str, deque] = {}

    def _trim(self, q: deque, now: float) -> None:
        while q and q[0][0] <= now - self.WINDOW_S:
            q.popleft()

    def admit(self, who) -> Optional[int]:
        """None when the request may go (and is counted); else the seconds to wait."""
        now = time.monotonic()
        waits = []
        reqs = self.requests.setdefault(who.key_id, deque())
        toks = self.tokens.setdefault(who.key_id, deque())
        self._trim(reqs, now)
        self._trim(toks, now)
        if who.requests_per_minute and len(reqs) >= who.requests_per_minute:
            waits.append(reqs[0][0] + self.WINDOW_S - now)
        if who.tokens_per_minute and sum(n for _, n in toks) >= who.tokens_per_minute:
            waits.append(toks[0][0] + self.WINDOW_S - now)
        if waits:
            return max(1, int(max(waits) + 0.999))
        reqs.append((now, 1))
        return None

    def spend(self, who, tokens: int) -> None:
        if who.tokens_per_minute and tokens:
            self.tokens.setdefault(who.key_id, deque()).append((time.monotonic(), tokens))


class Usage:
    """Per-tenant counters: requests, prompt and completion tokens, errors, rate-limited requests; in GET /v1/stats
    and as Prometheus metrics (rayft_serve_tenant_*), exported with Ray Serve's own."""

    FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited")

    def __init__(self):
        self.by_tenant: dict[str, dict[str, int]] = {}
        self._metrics = None

    def _counters(self):
        if self._metrics is None:
            try:
                from ray.util.metrics import Counter

                self._metrics = {f: Counter(f"rayft_serve_tenant_{f}", f"Per-tenant {f.replace('_', ' ')}.",
                                            tag_keys=("tenant",)) for f in self.FIELDS}
            except Exception:  # noqa: BLE001 - outside a Ray worker (unit tests): counters only
                self._metrics = {}
        return self._metrics

    def count(self, tenant: str, prompt_tokens: int = 0, completion_tokens: int = 0, error: bool = False,
              rate_limited: bool = False) -> None:
        row = self.by_tenant.setdefault(tenant, dict.fromkeys(self.FIELDS, 0))
        add = {"requests": 1, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "errors": int(error or rate_limited), "rate_limited": int(rate_limited)}
        metrics = self._counters()
        for k, v in add.items():
            if v:
                row[k] += v
                if k in metrics:
                    metrics[k].inc(v, tags={"tenant": tenant})
