"""Access checks for CLI commands: `require(cfg, action, target)` before anything is changed.

The principal is $RAYFT_USER, else the operating-system user; the policy and audit log come from the config's
`security:` section, else RAYFT_POLICY_FILE / RAYFT_AUDIT_LOG. Without a policy everything is allowed (and still
audited when there is an audit log). A denial raises train.access.AccessDenied, which the CLI turns into exit 2
with a message naming the principal, the role, the action and what to change.
"""
from __future__ import annotations

from typing import Optional, Union

from rayft.security.access import AccessDenied, Decision, authorize, current_user, load_policy
from rayft.security.config import SecurityConfig


def security_of(cfg) -> SecurityConfig:
    """The security settings of a RayftConfig, a SecurityConfig, or None (defaults + environment variables)."""
    if cfg is None:
        return SecurityConfig()
    if isinstance(cfg, SecurityConfig):
        return cfg
    return cfg.security


def require(cfg: Union[SecurityConfig, object, None], action: str, target: str,
            principal: Optional[str] = None) -> Decision:
    """Allow `action` on `target` for the current user, or raise AccessDenied; one audit line either way."""
    sec = security_of(cfg)
    policy_path = sec.resolved_policy_file
    policy = load_policy(policy_path) if policy_path else None
    decision = authorize(policy, principal or current_user(), action, target, sec.resolved_audit_log,
                         kind="user", source="cli")
    if not decision.allowed:
        raise AccessDenied(decision)
    return decision
