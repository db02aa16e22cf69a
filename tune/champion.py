"""Crowning: the best adapter (of a search, or of a training run) is merged, registered as `challenger`,
and promoted to `champion` when the promotion policy (`rayft.registry.promotion`) says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from rayft.data import storage
from rayft.registry.promotion import CHALLENGER, CHAMPION, current_version, decide, decide_by_metric, record_verdict


@dataclass
class Crowned:
    """What crowning did: the merged export, the registered version, and the alias it got."""

    merged_dir: Optional[str]
    registered: Optional[object] = None  # train.registry.RegisteredVersion
    promoted: Optional[str] = None  # "champion" | "challenger" | None (not registered)
    why: str = ""


def crown_run(run_dir: str, out_dir: str, name: Optional[str], uri: Optional[str], eval_loss: Optional[float],
              fingerprint: Optional[str], policy: str, min_improvement: float, log: Callable[[str], None] = print,
              tags: Optional[dict] = None, gate: Optional[Callable] = None) -> Crowned:
    """Export and merge the best checkpoint of `run_dir`, register it as `challenger` of `name`, and promote it to
    `champion` when the policy says so. Used by `rayft tune` (its best trial) and `rayft run` (the training run).

    `gate(merged_dir, version, champion)` decides policy `better_metric` (see `metric_gate`): it evaluates both
    versions on the golden set and returns a registry.promotion.MetricVerdict, recorded on the version's tags and
    in the audit log."""
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
    champion = current_version(uri, name, CHAMPION)
    if policy == "better_metric":
        if gate is None:
            should_promote, why = False, ("policy better_metric needs the golden set of the run's config (rayft tune, "
                                          "rayft run with a tune section); the new version stays `challenger`")
        else:
            verdict = gate(result.merged_dir or result.adapter_dir, version, champion)
            should_promote, why = verdict.promote, verdict.why
    else:
        should_promote, why = decide(policy, min_improvement, eval_loss, fingerprint, champion)
    if should_promote:
        promote(uri, name, version, CHAMPION)
        log(f"{name} v{version} is now `champion` ({why}); serve it with models:/{name}@{CHAMPION}")
        return Crowned(result.merged_dir, result.registered, CHAMPION, why)
    log(f"{name} v{version} is `challenger`, not promoted: {why}")
    return Crowned(result.merged_dir, result.registered, CHALLENGER, why)


def crown(cfg, outcome, data, uri: Optional[str], log: Callable[[str], None] = print) -> None:
    best = outcome.best
    name = cfg.registered_model_name
    tcfg = cfg.tune
    tags = {"rayft.search": os.path.basename(outcome.search_dir)}
    if tcfg.is_task_metric and best.best_metric is not None:  # what ASHA ranked the trials by, on the search sample
        tags.update({"rayft.search_metric": tcfg.metric, f"search_{tcfg.metric}": best.best_metric})
    gate = metric_gate(cfg, name, uri, log) if tcfg.promotion.policy == "better_metric" and uri and name else None
    done = crown_run(best.run_dir, storage.join(outcome.search_dir, "export"), name, uri, best.best_eval_loss,
                     data.fingerprint, tcfg.promotion.policy, tcfg.promotion.min_improvement, log, tags=tags, gate=gate)
    outcome.merged_dir, outcome.registered, outcome.promoted = done.merged_dir, done.registered, done.promoted
    if done.registered is None:
        outcome.notes.append("tracking is off: the merged champion candidate is exported but not registered")


def metric_gate(cfg, name: str, uri: str, log: Callable[[str], None] = print) -> Callable:
    """The better_metric decision for `cfg` (a RayftConfig): the challenger (the merged export) and the current
    champion answer the same golden set, and the gain in `promotion.metric` is judged with a paired bootstrap."""
    import functools

    from rayft.eval.compare import paired_bootstrap
    from rayft.eval.golden import load_golden
    from rayft.eval.run import evaluate_source
    from rayft.security.artifacts import opened_for_load

    policy, ecfg = cfg.tune.promotion, cfg.eval

    def gate(challenger_dir: str, version: str, champion):
        from rayft.eval.config import EvalError

        from .search import SearchError

        try:
            return judge(challenger_dir, version, champion)
        except EvalError as e:
            raise SearchError(f"promotion.policy better_metric: {e}; {name} v{version} stays `challenger`") from None

    def judge(challenger_dir: str, version: str, champion):
        golden = load_golden(cfg.data, ecfg.sources, log=lambda m: None)
        examples = golden.sample(ecfg.max_examples, ecfg.seed)
        log(f"promotion (better_metric, {policy.metric}): {golden.describe()}, {len(examples)} scored")
        run = functools.partial(evaluate_source, base=cfg.model, examples=examples, cfg=ecfg,
                                opener=functools.partial(opened_for_load, security=cfg.security), tracking_uri=uri,
                                chat_template=cfg.data.chat_template, metrics=[policy.metric], lm_eval=False, log=log)
        challenger = run(challenger_dir, label=f"challenger v{version}")
        score = challenger.aggregates[policy.metric]
        if champion is None:
            verdict = decide_by_metric(policy.metric, policy.min_improvement, policy.confidence, score,
                                       examples=len(examples))
        else:
            held = run(f"models:/{name}/{champion.version}", label=f"champion v{champion.version}")
            interval = paired_bootstrap([r["scores"][policy.metric] for r in held.rows],
                                        [r["scores"][policy.metric] for r in challenger.rows],
                                        ecfg.bootstrap_samples, policy.confidence, ecfg.seed)
            verdict = decide_by_metric(policy.metric, policy.min_improvement, policy.confidence, score, champion,
                                       held.aggregates[policy.metric], interval, len(examples))
        record_verdict(uri, name, version, verdict, cfg.security.resolved_audit_log)
        return verdict

    return gate
