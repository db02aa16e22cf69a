"""Access control: one policy file maps roles to actions and people (and serving tenants) to roles; every decision,
allowed or denied, is one JSON line in the audit log.

Policy file (YAML), for example examples/security/policy.yaml:

    roles:
      admin: ["*"]                                   # every action
      engineer: [train, tune, promote, rollback, deploy, infer]
      researcher: [train, tune, infer]
      tenant: [infer]
    users:                                           # CLI principals: $RAYFT_USER, else the OS user
      alice: admin
      bob: engineer
    tenants:                                         # serving principals: the `tenant` of an API key
      acme: tenant
    default_role: null                               # role of anyone not listed; null: denied

Audit line: {"ts", "who", "kind", "role", "action", "target", "outcome": "allowed"|"denied", "reason", "source",
"policy"} (+ "os_user" when $RAYFT_USER names someone else, + "submitted_by" inside a job started by `rayft submit`:
the principal who submitted it, from $RAYFT_SUBMITTED_BY). Targets are scrubbed of URL credentials and query
strings; API keys and artifact keys are never passed here at all.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ACTIONS = ("train", "tune", "promote", "rollback", "delete", "deploy", "infer")
Action = Literal["train", "tune", "promote", "rollback", "delete", "deploy", "infer", "*"]
USER_ENV = "RAYFT_USER"
# Set by `rayft submit` in the job's environment: who submitted the job. Inside a cluster this is attribution,
# not enforcement (anyone holding the cluster's token can run any code there).
SUBMITTED_BY_ENV = "RAYFT_SUBMITTED_BY"


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file, the field and the fix."""


class AccessDenied(PermissionError):
    """The policy does not allow this principal this action; the message says who, which role and what to change."""

    def __init__(self, decision: Decision):
        super().__init__(decision.explain())
        self.decision = decision


class PolicyFile(BaseModel):
    """The policy file's schema."""

    model_config = ConfigDict(extra="forbid")

    roles: dict[str, list[Action]] = Field(description="Role -> actions it may take (`*`: all).")
    users: dict[str, str] = Field(default_factory=dict, description="CLI user -> role.")
    tenants: dict[str, str] = Field(default_factory=dict, description="Serving tenant (API key) -> role.")
    default_role: Optional[str] = Field(default=None, description="Role of a principal not listed; null: denied.")

    @model_validator(mode="after")
    def _roles_defined(self):
        known = sorted(self.roles)
        for section in ("users", "tenants"):
            for name, role in getattr(self, section).items():
                if role not in self.roles:
                    raise ValueError(f"{section}.{name}: role {role!r} is not defined under roles (defined: "
                                     f"{', '.join(known) or 'none'})")
        if self.default_role is not None and self.default_role not in self.roles:
            raise ValueError(f"default_role: {self.default_role!r} is not defined under roles (defined: "
                             f"{', '.join(known) or 'none'}); use one of them or null")
        return self


@dataclass(frozen=True)
class Policy:
    path: str
    roles: dict
    users: dict
    tenants: dict
    default_role: Optional[str]

    def role_of(self, principal: str, kind: str) -> Optional[str]:
        table = self.tenants if kind == "tenant" else self.users
        return table.get(principal, self.default_role)

    def allows(self, role: str, action: str) -> bool:
        actions = self.roles.get(role, ())
        return "*" in actions or action in actions


def load_policy(path: str) -> Policy:
    import yaml

    if not os.path.isfile(path):
        raise PolicyError(f"policy file {path!r} does not exist; fix security.policy_file (or RAYFT_POLICY_FILE) or "
                          f"write the file (see examples/security/policy.yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PolicyError(f"policy file {path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"policy file {path}: the top level must be a mapping with roles, users, tenants")
    try:
        pf = PolicyFile.model_validate(raw)
    except ValidationError as e:
        lines = [f"policy file {path}: {e.error_count()} problem(s)"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "literal_error":
                msg = f"{err.get('input')!r} is not an action; actions are {', '.join(ACTIONS)} or *"
            elif err["type"] == "extra_forbidden":
                msg = "unknown field; allowed: roles, users, tenants, default_role"
            lines.append(f"  {loc}: {msg}")
        raise PolicyError("\n".join(lines)) from None
    return Policy(path, {r: frozenset(a) for r, a in pf.roles.items()}, dict(pf.users), dict(pf.tenants),
                  pf.default_role)


def current_user() -> str:
    """The CLI principal: $RAYFT_USER (CI, service accounts), else the operating-system user."""
    return os.environ.get(USER_ENV) or _os_user()


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    who: str
    kind: str  # "user" | "tenant"
    role: Optional[str]
    action: str
    target: str
    reason: str
    policy: Optional[str]

    def explain(self) -> str:
        if self.allowed:
            return f"{self.kind} {self.who!r} may {self.action} {self.target}: {self.reason}"
        fix = (f"ask an admin to give {self.kind} {self.who!r} a role that allows {self.action!r} in {self.policy}"
               + (f" (set {USER_ENV} if you act as another account)" if self.kind == "user" else ""))
        return (f"access denied: {self.kind} {self.who!r} (role {self.role or 'none'}) may not {self.action} "
                f"{self.target}: {self.reason}; {fix}")


def decide(policy: Optional[Policy], principal: str, action: str, target: str, kind: str = "user") -> Decision:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; actions are {', '.join(ACTIONS)}")
    if policy is None:
        return Decision(True, principal, kind, None, action, target, "no policy file configured: every action is "
                        "allowed", None)
    role = policy.role_of(principal, kind)
    if role is None:
        return Decision(False, principal, kind, None, action, target,
                        f"{kind} {principal!r} is not listed under {'tenants' if kind == 'tenant' else 'users'} "
                        f"and the policy has no default_role", policy.path)
    if policy.allows(role, action):
        return Decision(True, principal, kind, role, action, target, f"role {role} allows {action}", policy.path)
    allowed = sorted(policy.roles.get(role, ()))
    return Decision(False, principal, kind, role, action, target,
                    f"role {role} allows only {', '.join(allowed) or 'nothing'}", policy.path)


_URL_SECRETS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_QUERY = re.compile(r"(?P<base>[A-Za-z][A-Za-z0-9+.-]*://[^\s?]*)\?\S*")


def scrub(text: str) -> str:
    """Remove URL credentials (`https://user:token@host`) and query strings (signed URLs) from a target."""
    text = _URL_SECRETS.sub(lambda m: m.group("scheme"), text)
    return _QUERY.sub(lambda m: m.group("base"), text)


class AuditLog:
    """Append-only JSON Lines file, opened once; each decision is one write() of one line (O_APPEND keeps lines of
    concurrent processes whole on a local file system). The file is created readable by its owner only."""

    def __init__(self, path: str, submitted_by: Optional[str] = None):
        self.path = path
        # Who submitted the job this process runs in (`rayft submit`); serving replicas get it from their driver.
        self.submitted_by = submitted_by or os.environ.get(SUBMITTED_BY_ENV) or None
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def record(self, decision: Decision, source: str) -> None:
        line = {"ts": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "who": decision.who, "kind": decision.kind, "role": decision.role, "action": decision.action,
                "target": scrub(decision.target), "outcome": "allowed" if decision.allowed else "denied",
                "reason": decision.reason, "source": source, "policy": decision.policy}
        if decision.kind == "user" and os.environ.get(USER_ENV) and os.environ[USER_ENV] != _os_user():
            line["os_user"] = _os_user()  # who really ran it, when $RAYFT_USER names someone else
        if self.submitted_by:
            line["submitted_by"] = self.submitted_by
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            os.write(self._fd, data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


def authorize(policy: Optional[Policy], principal: str, action: str, target: str,
              audit: Union[AuditLog, str, None] = None, kind: str = "user", source: str = "cli") -> Decision:
    """Decide, write one audit line (when there is an audit log), and return the decision (the caller refuses)."""
    decision = decide(policy, principal, action, target, kind)
    if audit is not None:
        log = AuditLog(audit) if isinstance(audit, str) else audit
        try:
            log.record(decision, source)
        finally:
            if isinstance(audit, str):
                log.close()
    return decision
