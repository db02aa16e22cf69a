"""Crowning: the best adapter (of a search, or of a training run) is merged, registered as `challenger`,
and promoted to `champion` when the promotion policy (`rayft.registry.promotion`) says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from rayft.data import storage
from rayft.registry.promotion import CHALLENGER, CHAMPION, current_version, decide


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
    from rayft.registry.tracking import client
    from rayft.registry.versions import promote
    from rayft.train.export import export_run

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
    name = cfg.registered_model_name
    done = crown_run(best.run_dir, storage.join(outcome.search_dir, "export"), name, uri, best.best_eval_loss,
                     data.fingerprint, cfg.tune.promotion.policy, cfg.tune.promotion.min_improvement, log,
                     tags={"rayft.search": os.path.basename(outcome.search_dir)})
    outcome.merged_dir, outcome.registered, outcome.promoted = done.merged_dir, done.registered, done.promoted
    if done.registered is None:
        outcome.notes.append("tracking is off: the merged champion candidate is exported but not registered")
