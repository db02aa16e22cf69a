"""The `security:` section of a rayft config: artifacts at rest, weight formats, access policy, audit log.

The artifact key is never part of the config: the config names where the key is (an environment variable
or a file), so a config file can be committed, logged to MLflow and printed by `rayft config show`.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_KEY_ENV = "RAYFT_ARTIFACT_KEY"
POLICY_ENV = "RAYFT_POLICY_FILE"
AUDIT_ENV = "RAYFT_AUDIT_LOG"
KEY_BYTES = 32  # AES-256

# Field names a user might reach for to paste the key itself into the config.
_KEY_VALUE_FIELDS = {"key", "artifact_key", "encryption_key", "secret", "secret_key", "password", "key_value",
                     "aes_key"}


class ArtifactKeyError(ValueError):
    """The artifact key is missing or malformed; the message says where it was looked for (never its value)."""


class SecurityConfig(BaseModel):
    """Artifacts at rest, weight formats, and access control (security/config.py, security/artifacts.py, security/access.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    encrypt_artifacts: bool = Field(
        default=False,
        description="Encrypt exported adapters and merged models at rest with AES-256-GCM (the key from `key_env` "
        "or `key_file`). Loading decrypts into a private temporary folder that is removed once the weights are read.",
    )
    key_env: str = Field(
        default=DEFAULT_KEY_ENV,
        description="Environment variable holding the 256-bit artifact key as base64 (`openssl rand -base64 32`) "
        "or 64 hex characters. Read when `key_file` is unset.",
    )
    key_file: Optional[str] = Field(
        default=None,
        description="File holding the artifact key (base64, 64 hex characters, or 32 raw bytes), for example a "
        "mounted secret; takes precedence over `key_env`. Keep it readable by its owner only (chmod 600).",
    )
    allow_pickle_weights: bool = Field(
        default=False,
        description="Allow pickle-based weight files (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`). Off: only "
        "safetensors are loaded and a folder holding a pickle file is refused, since unpickling can run code.",
    )
    require_manifest: bool = Field(
        default=False,
        description="Refuse to load a local folder without `rayft-manifest.json` (every rayft export has one). Off: "
        "such a folder loads as an unverified base model, with a warning. Registry and run URIs (`models:/`, "
        "`runs:/`) of rayft exports are always checked against the manifest hash recorded when they were registered.",
    )
    policy_file: Optional[str] = Field(
        default=None,
        description="Access policy (YAML: roles -> actions, users and serving tenants -> role), enforced by the CLI "
        "for training, registry changes and deployments and by the server for inference. Unset: the "
        "RAYFT_POLICY_FILE environment variable; neither set: every action is allowed (and still audited when "
        "there is an audit log).",
    )
    audit_log: Optional[str] = Field(
        default=None,
        description="JSON Lines file that gets one line per access decision (ts, who, role, action, target, "
        "outcome, reason); never a secret. Unset: the RAYFT_AUDIT_LOG environment variable; neither set: no audit.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_config(cls, data: Any) -> Any:
        if isinstance(data, dict):
            pasted = sorted(k for k in data if str(k).lower() in _KEY_VALUE_FIELDS)
            if pasted:
                raise ValueError(
                    f"{', '.join(pasted)}: a key or secret is never written in the config (configs are logged and "
                    f"committed); remove it and put the key in the environment variable named by key_env (default "
                    f"{DEFAULT_KEY_ENV}) or in a file named by key_file"
                )
        return data

    @field_validator("key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", v) or _looks_like_key(v):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, '_', for example "
                f"{DEFAULT_KEY_ENV}), not the key itself; export the key in that variable"
            )
        return v

    @property
    def resolved_policy_file(self) -> Optional[str]:
        return self.policy_file or os.environ.get(POLICY_ENV) or None

    @property
    def resolved_audit_log(self) -> Optional[str]:
        return self.audit_log or os.environ.get(AUDIT_ENV) or None

    def key_source(self) -> str:
        """Where the key is read from, for messages (never the key)."""
        return f"security.key_file {self.key_file!r}" if self.key_file else f"the environment variable {self.key_env}"


def _looks_like_key(text: str) -> bool:
    return parse_key_text(text) is not None


def parse_key_text(text: str) -> Optional[bytes]:
    """32 key bytes from 64 hex characters or base64 of 32 bytes; None when the text is neither."""
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    if re.fullmatch(r"[A-Za-z0-9+/_-]{42,44}={0,2}", text):
        try:
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            return None
        return raw if len(raw) == KEY_BYTES else None
    return None


def load_key(security: SecurityConfig) -> bytes:
    """The 256-bit artifact key from `security.key_file`, else the variable `security.key_env`."""
    how = ("make one with `openssl rand -base64 32` (or python -c \"import base64,os; "
           "print(base64.b64encode(os.urandom(32)).decode())\")")
    if security.key_file:
        path = security.key_file
        if not os.path.isfile(path):
            raise ArtifactKeyError(f"security.key_file: {path!r} does not exist; write the key there ({how}) "
                                   f"or unset key_file to read it from ${security.key_env}")
        with open(path, "rb") as f:
            data = f.read()
        if len(data) == KEY_BYTES:
            return data
        try:
            key = parse_key_text(data.decode("ascii"))
        except UnicodeDecodeError:
            key = None
        if key is None:
            raise ArtifactKeyError(f"security.key_file {path!r}: not a 256-bit key (expected 32 raw bytes, 64 hex "
                                   f"characters or base64 of 32 bytes; the file has {len(data)} bytes); {how}")
        return key
    value = os.environ.get(security.key_env)
    if not value:
        raise ArtifactKeyError(f"the artifact key is not set: the environment variable {security.key_env} is empty "
                               f"or missing; {how} and export {security.key_env}=<key>, or point security.key_file "
                               f"at a file holding it")
    key = parse_key_text(value)
    if key is None:
        raise ArtifactKeyError(f"the environment variable {security.key_env} does not hold a 256-bit key (expected 64 "
                               f"hex characters or base64 of 32 bytes; it has {len(value.strip())} characters); {how}")
    return key
