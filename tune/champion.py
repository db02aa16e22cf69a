"""Crowning: the search's best adapter is merged, registered as `challenger`, and promoted to
`champion` by the config's policy.

`better_eval_loss` compares eval losses only when both versions were measured on the same eval set
(same dataset fingerprint); otherwise the challenger stays a challenger and the log says why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

CHALLENGER, CHAMPION = "challenger", "champion"


def current_version(uri: str, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    from train.tracking import client

    try:
        return client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def decide(policy: str, min_improvement: float, challenger_loss: Optional[float], challenger_fp: Optional[str],
           champion) -> tuple[bool, str]:
    """(promote?, why) for a challenger against the current champion version (or None)."""
    if policy == "never":
        return False, "policy `never`: the new version stays `challenger`"
    if policy == "always":
        return True, "policy `always`"
    if champion is None:
        return True, "there is no champion yet"
    tags = dict(champion.tags or {})
    if challenger_fp is None or tags.get("dataset_fingerprint") != challenger_fp:
        return False, (f"champion v{champion.version} was measured on another eval set (fingerprint "
                       f"{tags.get('dataset_fingerprint')} vs {challenger_fp}); eval losses are not comparable, so "
                       f"the new version stays `challenger` (promote it by hand after checking)")
    try:
        champion_loss = float(tags["eval_loss"])
    except (KeyError, ValueError):
        return True, f"champion v{champion.version} has no eval loss recorded"
    if challenger_loss is not None and challenger_loss < champion_loss - min_improvement:
        return True, f"eval loss {challenger_loss:.4f} beats champion v{champion.version}'s {champion_loss:.4f}"
    return False, (f"eval loss {challenger_loss:.4f} does not beat champion v{champion.version}'s "
                   f"{champion_loss:.4f} by more than {min_improvement}")


@dataclass
class Crowned:
    """What crowning did: the merged export, the registered version, and the alias it got."""

    merged_dir: Optional[str]
    registered: Optional[object] = None  # train.registry.RegisteredVersion
    promoted: Optional[str] = None  # "champion" | "challenger" | None (not registered)
    why: str = ""


def crown_run(run_dir: str, out_dir: str, name: Optional[str], uri: Optional[str], eval_loss: Optional[float],
              fingerprint: Optional[str], policy: str, min_improvement: float, log: Callable[[str], None] = print,
              tags: Optional[dict] = None) -> Crowned:
    """Export and merge the best checkpoint of `run_dir`, register it as `challenger` of `name`, and promote it to
    `champion` when the policy says so. Used by `rayft tune` (its best trial) and `rayft run` (the training run)."""
    from train.export import export_run
    from train.registry import promote
    from train.tracking import client

    result = export_run(run_dir, out_dir, merge=True, log=log, register=name if (uri and name) else None)
    if not (uri and name and result.registered):
        return Crowned(result.merged_dir, why="tracking is off: the merged model is exported but not registered")
    version = result.registered.version
    c = client(uri)
    # The version's eval loss is that of the exported (best) checkpoint.
    if eval_loss is not None:
        c.set_model_version_tag(name, version, "eval_loss", str(eval_loss))
    for k, v in (tags or {}).items():
        c.set_model_version_tag(name, version, k, str(v))
    promote(uri, name, version, CHALLENGER)
    should_promote, why = decide(policy, min_improvement, eval_loss, fingerprint, current_version(uri, name, CHAMPION))
    if should_promote:
        promote(uri, name, version, CHAMPION)
        log(f"{name} v{version} is now `champion` ({why}); serve it with models:/{name}@{CHAMPION}")
        return Crowned(result.merged_dir, result.registered, CHAMPION, why)
    log(f"{name} v{version} is `challenger`, not promoted: {why}")
    return Crowned(result.merged_dir, result.registered, CHALLENGER, why)


def crown(cfg, outcome, data, uri: Optional[str], log: Callable[[str], None] = print) -> None:
    best = outcome.best
    name = cfg.tracking.register_model if cfg.tracking.register_model is not None else cfg.name
    done = crown_run(best.run_dir, os.path.join(outcome.search_dir, "export"), name, uri, best.best_eval_loss,
                     data.fingerprint, cfg.tune.promotion.policy, cfg.tune.promotion.min_improvement, log,
                     tags={"rayft.search": os.path.basename(outcome.search_dir)})
    outcome.merged_dir, outcome.registered, outcome.promoted = done.merged_dir, done.registered, done.promoted
    if done.registered is None:
        outcome.notes.append("tracking is off: the merged champion candidate is exported but not registered")
