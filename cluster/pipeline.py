"""`rayft run FILE`: the whole pipeline as one command (and one job on a cluster).

    data    -> the sources are read, validated, redacted, rendered, tokenized and packed (report + rejects file)
    train   -> one Ray Train run, or, when the config has a `tune:` section, a Ray Tune search (ASHA)
    export  -> the best checkpoint's adapter, merged into the base (logit-checked)
    register-> a new MLflow model version, alias `challenger`; `champion` when the promotion policy says so
    serve   -> with --serve: the champion behind the OpenAI-compatible API until interrupted

Each stage prints its result and where it lives. Ray must be connected by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from rayft.data import storage


@dataclass
class RunOutcome:
    run_dir: str  # the training run, or the search folder
    data_report: Optional[str] = None
    rejects: Optional[str] = None
    eval_loss: Optional[float] = None
    adapter_dir: Optional[str] = None
    merged_dir: Optional[str] = None
    model_name: Optional[str] = None
    version: Optional[str] = None
    alias: Optional[str] = None  # "champion" | "challenger" | None (tracking off)
    tracking_uri: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def serve_target(self) -> str:
        """What to serve: the registry's champion when there is one, else the merged folder of this run."""
        if self.model_name and self.alias:
            return f"models:/{self.model_name}@champion"
        return self.merged_dir


def _stage(log, n: int, name: str, text: str) -> None:
    log(f"\n[{n}/5 {name}] {text}")


def _best_eval_loss(checkpoint: Optional[str], metrics: dict) -> Optional[float]:
    """The eval loss of the checkpoint that is exported (the best one), not the last evaluation's."""
    from rayft.train.checkpoint import read_state

    if checkpoint:
        try:
            loss = read_state(checkpoint).get("eval_loss")
            if loss is not None:
                return float(loss)
        except (OSError, ValueError):
            pass
    loss = metrics.get("eval_loss")
    return float(loss) if loss is not None else None


def effective_promotion(cfg, override: Optional[str] = None):
    """The promotion policy a run applies: `--promote` when given, else `tune.promotion`, else the default
    (`better_eval_loss`). The CLI's access check and the crowning both read it from here."""
    from rayft.registry.config import PromotionPolicy

    promotion = cfg.tune.promotion if cfg.tune is not None else PromotionPolicy()
    if override:
        promotion = promotion.model_copy(update={"policy": override})
    return promotion


def run_pipeline(cfg, *, resume: bool = False, policy: Optional[str] = None,
                 log: Callable[[str], None] = print) -> RunOutcome:
    """data -> train or tune -> export + merge -> register + promote. Returns where everything is."""
    promotion = effective_promotion(cfg, policy)
    name = cfg.registered_model_name
    if cfg.tune is not None:
        # The search crowns its best trial with the config's policy: --promote must reach it there.
        cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"promotion": promotion})})
        return _run_search(cfg, resume, log)
    return _run_training(cfg, resume, promotion, name or None, log)


def _run_training(cfg, resume: bool, promotion, name: Optional[str], log) -> RunOutcome:
    from rayft.train.trainer import fit, prepare_training_data
    from rayft.tune.champion import crown_run

    _stage(log, 1, "data", f"{len(cfg.data.sources)} source(s) -> {cfg.model.name_or_path}'s tokenizer")
    data = prepare_training_data(cfg, log=log)
    totals = data.report["totals"]
    log(f"data: {totals['read']} rows read, {totals['kept']} kept, {totals['rejected']} rejected; "
        f"fingerprint {data.fingerprint}")

    _stage(log, 2, "train", f"{cfg.train.num_workers} worker(s), DeepSpeed ZeRO-{cfg.train.deepspeed.zero_stage}, "
           f"LoRA rank {cfg.train.lora.rank}")
    out = fit(cfg, data, resume=resume, log=log, register=False)
    result = RunOutcome(out.run_dir, data_report=storage.join(out.run_dir, "data_report.json"),
                        rejects=storage.join(out.run_dir, "rejects.jsonl"), tracking_uri=out.tracking_uri)
    result.eval_loss = _best_eval_loss(out.checkpoint, out.metrics)
    m = out.metrics
    log(f"train: {m.get('global_step')}/{m.get('total_steps')} steps, best eval loss "
        f"{result.eval_loss if result.eval_loss is not None else '-'}; run folder {out.run_dir}; best checkpoint "
        f"{out.checkpoint}" + (f"; MLflow run {out.mlflow_run_id} ({out.tracking_uri})" if out.mlflow_run_id else ""))

    _stage(log, 3, "export", "best checkpoint -> adapter + merged model (logits checked) -> registry")
    export_dir = storage.join(out.run_dir, "export")
    crowned = crown_run(out.run_dir, export_dir, name, out.tracking_uri, result.eval_loss, data.fingerprint,
                        promotion.policy, promotion.min_improvement, log=log)
    return _fill(result, crowned, name, export_dir, log)


def _fill(result: RunOutcome, crowned, name: Optional[str], export_dir: str, log) -> RunOutcome:
    result.adapter_dir = storage.join(export_dir, "adapter")
    result.merged_dir = crowned.merged_dir
    if crowned.registered is not None:
        result.model_name, result.version, result.alias = name, crowned.registered.version, crowned.promoted
        _stage(log, 4, "register", f"{name} v{result.version} -> @{result.alias} ({crowned.why}) in {result.tracking_uri}")
    else:
        result.notes.append(crowned.why)
        _stage(log, 4, "register", f"skipped: {crowned.why}")
    return result


def _run_search(cfg, resume: bool, log) -> RunOutcome:
    from rayft.tune.search import run_search
    from rayft.tune.space import trial_count

    _stage(log, 1, "data", f"{len(cfg.data.sources)} source(s), prepared once for every trial")
    _stage(log, 2, "tune", f"{trial_count(cfg.tune)} trial(s) over {', '.join(cfg.tune.search_space)}")
    out = run_search(cfg, resume=resume, log=log)
    best = out.best
    result = RunOutcome(out.search_dir, tracking_uri=None, eval_loss=best.best_eval_loss if best else None)
    trial_dir = best.run_dir if best else None
    if trial_dir:
        result.data_report = storage.join(trial_dir, "data_report.json")
        result.rejects = storage.join(trial_dir, "rejects.jsonl")
    result.adapter_dir = storage.join(out.search_dir, "export", "adapter")
    result.merged_dir = out.merged_dir
    name = cfg.registered_model_name
    if out.registered is not None:
        from rayft.registry.tracking import tracking_uri

        result.tracking_uri = tracking_uri(cfg.tracking.tracking_uri, cfg.storage_root)
        result.model_name, result.version, result.alias = name, out.registered.version, out.promoted
    result.notes.extend(out.notes)
    _stage(log, 3, "export", f"best trial {best.trial_id if best else '-'} -> {result.adapter_dir}, merged {out.merged_dir}")
    if result.version:
        _stage(log, 4, "register", f"{name} v{result.version} -> @{result.alias} in {result.tracking_uri}")
    else:
        _stage(log, 4, "register", "skipped: " + "; ".join(out.notes))
    return result


def summary(out: RunOutcome) -> str:
    lines = ["", "pipeline finished:",
             f"  run folder      {out.run_dir}"]
    if out.data_report:
        lines.append(f"  data report     {out.data_report}")
    if out.rejects:
        lines.append(f"  rejected rows   {out.rejects}")
    if out.eval_loss is not None:
        lines.append(f"  best eval loss  {out.eval_loss:.4f}")
    lines.append(f"  adapter         {out.adapter_dir}")
    lines.append(f"  merged model    {out.merged_dir}")
    if out.version:
        lines.append(f"  registry        {out.model_name} v{out.version} @{out.alias} ({out.tracking_uri})")
    return "\n".join(lines)


def serve_stage(cfg, out: RunOutcome, serve: bool, log: Callable[[str], None] = print, port: Optional[int] = None):
    """The ServeConfig and model to serve, or None (and the command to serve later) without --serve."""
    from rayft.serve.config import ServeConfig

    target = out.serve_target
    if not serve:
        how = f"rayft serve --model {target}" + (f" --tracking-uri {out.tracking_uri}" if target.startswith("models:/") else "")
        _stage(log, 5, "serve", f"skipped (add --serve); serve it later with: {how}")
        return None
    raw = cfg.serve.model_dump(exclude_unset=True)
    raw["model"] = target
    if port is not None:
        raw["port"] = port
    scfg = ServeConfig.model_validate(raw)
    _stage(log, 5, "serve", f"{target} on http://{scfg.host}:{scfg.port}{scfg.route_prefix.rstrip('/')}/v1")
    return scfg
