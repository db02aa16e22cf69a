"""Access checks for CLI commands: `require(cfg, action, target)` before anything is changed.

The principal is $RAYFT_USER, else the operating-system user; the policy and audit log come from the config's
`security:` section, else RAYFT_POLICY_FILE / RAYFT_AUDIT_LOG. Without a policy everything is allowed (and still
audited when there is an audit log). A denial raises train.access.AccessDenied, which the CLI turns into exit 2
with a message naming the principal, the role, the action and what to change.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

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
            principal: Optional[str] = None, source: str = "cli") -> Decision:
    """Allow `action` on `target` for the current user, or raise AccessDenied; one audit line either way."""
    sec = security_of(cfg)
    policy_path = sec.resolved_policy_file
    policy = load_policy(policy_path) if policy_path else None
    decision = authorize(policy, principal or current_user(), action, target, sec.resolved_audit_log,
                         kind="user", source=source)
    if not decision.allowed:
        raise AccessDenied(decision)
    return decision


def planned_actions(cfg, command: str, *, promote: Optional[str] = None, serve: bool = False,
                    serve_model: Optional[str] = None) -> list[tuple[str, str]]:
    """(action, target) for every access check the command `command` makes on the config `cfg` before it starts:
    `train` trains, `tune` tunes (and promotes when the search may crown a champion), `run` trains or tunes,
    promotes per the effective promotion policy and, with `serve`, deploys; `serve` deploys. The CLI commands and
    `rayft submit` (for the command inside the job) both check this list."""
    from .pipeline import effective_promotion

    name = cfg.registered_model_name
    model = cfg.model.name_or_path
    if command == "train":
        return [("train", f"run {cfg.name} (model {model})")]
    if command == "serve":
        return [("deploy", serve_model or cfg.serve.model or model)]
    if command not in ("tune", "run"):
        return []
    searches = cfg.tune is not None
    if command == "tune" or searches:
        out = [("tune", f"search {cfg.name} (model {model})")]
    else:
        out = [("train", f"run {cfg.name} (model {model})")]
    if name and effective_promotion(cfg, promote).policy != "never":  # the run may crown a champion at its end
        out.append(("promote", f"models:/{name}@champion"))
    if command == "run" and serve:
        out.append(("deploy", f"models:/{name}@champion" if name else f"{cfg.name} merged"))
    return out


def command_actions(cfg, command: Sequence[str]) -> list[tuple[str, str]]:
    """`planned_actions` for a command line as `rayft submit` receives it after `--` (`run --serve --promote never`)."""
    import argparse

    if not command:
        return []
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--promote")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--model")
    known, _ = p.parse_known_args(list(command[1:]))
    return planned_actions(cfg, command[0], promote=known.promote, serve=known.serve, serve_model=known.model)
