"""The promotion policy: does a challenger version replace the champion?

`better_eval_loss` compares eval losses only when both versions were measured on the same eval set
(same dataset fingerprint); otherwise the challenger stays a challenger and the reason says why.
"""
from __future__ import annotations

from typing import Optional

CHALLENGER, CHAMPION = "challenger", "champion"


def current_version(uri: str, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    from .tracking import client

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
