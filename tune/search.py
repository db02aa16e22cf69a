"""`rayft tune`: Ray Tune over the training loop, ASHA on eval loss (or a task metric), then export, register and
promote.

Each trial is a real distributed training run: a small driver task per trial starts one TorchTrainer
(the same `train_loop_per_worker` as `rayft train`) whose reports reach Tune through
`TuneReportCallback`. The data is prepared once and shared by every trial. With `tune.metric` naming a task
metric, the workers also score a fixed sample of the golden set at each evaluation step (eval/in_training.py),
and ASHA and the choice of the best trial rank by it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rayft.data import storage
from rayft.train.trainer import TrainingError

from .space import apply_params, largest_trial, to_tune_space, validate_space

# The driver task of a trial only waits on its TorchTrainer; Tune refuses a zero request.
DRIVER_CPUS = 0.01


class SearchError(TrainingError):
    """A search that cannot start or finish; the message says what to change."""


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    best_eval_loss: Optional[float]
    steps: int
    stopped_early: bool
    status: str
    run_dir: Optional[str]
    best_metric: Optional[float] = None  # of tune.metric over the trial's evaluations (eval loss: best_eval_loss)


@dataclass
class SearchOutcome:
    search_dir: str
    trials: list[TrialRow]
    best: Optional[TrialRow]
    steps_run: int
    steps_full: int
    registered: Any = None
    promoted: Optional[str] = None
    merged_dir: Optional[str] = None
    mlflow_parent_run_id: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    metric: str = "eval_loss"
    mode: str = "min"

    @property
    def compute_fraction(self) -> float:
        return self.steps_run / self.steps_full if self.steps_full else 1.0


def trial_train_config(train_cfg):
    """The train section a trial runs with: its driver task (idle while the workers train) borrows
    DRIVER_CPUS from the workers, so a trial holds exactly num_workers x cpus_per_worker CPUs and two
    one-worker trials fit two CPUs."""
    share = DRIVER_CPUS / train_cfg.num_workers
    return train_cfg.model_copy(update={"cpus_per_worker": max(train_cfg.cpus_per_worker - share, share)})


def trial_resources(train_cfg) -> dict[str, float]:
    """What one trial holds while it runs: its workers plus its driver task."""
    t = trial_train_config(train_cfg)
    need = {"CPU": t.num_workers * t.cpus_per_worker + DRIVER_CPUS}
    if train_cfg.use_gpu:
        need["GPU"] = float(train_cfg.num_workers)
    return need


def check_fits(train_cfg, cluster: dict[str, float], max_concurrent: Optional[int], tune_cfg=None) -> int:
    """How many trials can run at once; an error when one trial can never fit the cluster. With `tune_cfg`, the
    trial checked is the largest the search space can produce (num_workers and cpus_per_worker may be searched)."""
    searched: dict = {}
    if tune_cfg is not None:
        train_cfg, searched = largest_trial(train_cfg, tune_cfg)
    need = trial_resources(train_cfg)
    for res, amount in need.items():
        have = float(cluster.get(res, 0.0))
        if amount > have + 1e-9:
            where = (f" ({' and '.join(f'{k} {v:g}' for k, v in searched.items())}: the largest in "
                     f"tune.search_space)") if searched else ""
            fix = ("lower the largest value searched in tune.search_space" if searched
                   else "lower train.num_workers or train.cpus_per_worker")
            raise SearchError(
                f"one trial needs {amount:g} {res} (train.num_workers {train_cfg.num_workers} x "
                f"{'1 GPU' if res == 'GPU' else f'train.cpus_per_worker {train_cfg.cpus_per_worker:g}'}){where} but "
                f"the cluster has {have:g}; {fix}, or add nodes (a trial that cannot fit would wait forever)"
            )
    fit = min(int((float(cluster.get(r, 0.0)) + 1e-9) // a) for r, a in need.items() if a > 0)
    return max(1, min(fit, max_concurrent or fit))


def _trial_driver(config: dict, cfg=None, data=None, search_dir: str = "", parent_run: Optional[dict] = None,
                  log_queue=None) -> None:
    """One trial: the run's config with the trial's values, trained by the shared training code."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayft.data.storage import apply_storage_settings
    from rayft.train.trainer import fit

    apply_storage_settings(cfg.storage)  # this trial may run on another node: the same endpoint there
    params = {k: v for k, v in config.items() if k.startswith("train.")}
    trial_train = trial_train_config(apply_params(cfg.train, params))
    trial_id = tune.get_context().get_trial_id()
    trial_cfg = cfg.model_copy(update={"train": trial_train})
    run_name = f"trial-{trial_id}"

    def log(message) -> None:  # the trial's lines reach the search's terminal (worker output is not forwarded)
        try:
            log_queue.put_nowait(f"{run_name}  {message}")
        except Exception:  # no queue, or a full one: never stop training for a log line
            print(message, flush=True)

    # Tune ends this task as soon as ASHA stops the trial or it reports its last step, so nothing after
    # fit() is sure to run: the trial's run folder (checkpoints, rayft_run.json) is its result.
    fit(trial_cfg, data, run_name=run_name, storage_path=storage.join(search_dir, "trials"),
        callbacks=[TuneReportCallback()], mlflow_parent=parent_run, register=False,
        mlflow_run_name=f"{cfg.name}/{run_name}", extra_params=params, log=log)


def run_search(cfg, resume: bool = False, log: Callable[[str], None] = print) -> SearchOutcome:
    """Run the search described by `cfg.tune` (cfg is the composed RayftConfig)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from rayft.registry.tracking import open_run, tracking_uri
    from rayft.train.trainer import prepare_training_data

    tcfg = cfg.tune
    if tcfg is None:
        raise SearchError(f"{cfg.name}: the config has no `tune:` section; add one (see examples/quickstart.yaml)")
    validate_space(tcfg, cfg.train)
    # Training reports at logging steps carry no eval loss; ASHA skips those, Tune's strict check must too.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"

    root = cfg.storage_root
    search_name = f"{cfg.name}-search"
    search_dir = storage.join(root, search_name)  # a folder, or a bucket prefix: every trial's run folder is in it
    cluster = ray.cluster_resources()
    # Check the largest trial the space can produce (num_workers and cpus_per_worker may be searched too).
    concurrency = check_fits(cfg.train, cluster, tcfg.max_concurrent_trials, tcfg)

    data = prepare_training_data(cfg, log=log)
    metric, mode = tcfg.metric, tcfg.metric_mode
    if tcfg.is_task_metric:
        data.task_eval = task_eval_payload(cfg, log)
    max_steps = tcfg.asha.max_steps or data.plan["total_steps"]
    search_train = cfg.train.model_copy(update={"max_steps": max_steps})
    cfg = cfg.model_copy(update={"train": search_train})

    uri = parent_id = None
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg.tracking.tracking_uri, root)
        parent_id = open_run(uri, cfg.tracking.experiment, search_name, root,
                             {"tune": tcfg.model_dump(mode="json"), "base": cfg.model_dump(mode="json", by_alias=True)},
                             {"rayft.kind": "search", "dataset_fingerprint": data.fingerprint})
    parent = {"uri": uri, "run_id": parent_id} if parent_id else None

    scheduler = (ASHAScheduler(time_attr="global_step", metric=metric, mode=mode, max_t=max_steps,
                               grace_period=min(tcfg.asha.grace_period_steps, max_steps),
                               reduction_factor=tcfg.asha.reduction_factor)
                 if tcfg.asha.enabled else FIFOScheduler())
    from ray.util.queue import Queue

    from rayft.train.trainer import ProgressPrinter, driver_local_actor

    log_queue = Queue(maxsize=1000, actor_options=driver_local_actor())
    printer = ProgressPrinter(log_queue, log)
    trainable = tune.with_resources(
        tune.with_parameters(_trial_driver, cfg=cfg, data=data, search_dir=search_dir, parent_run=parent,
                             log_queue=log_queue),
        {"cpu": DRIVER_CPUS})
    search_alg = None
    if tcfg.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as e:
            raise SearchError(f"tune.algorithm: optuna needs the optuna package ({e}); pip install optuna, or use random") from None
        search_alg = OptunaSearch(metric=metric, mode=mode, seed=tcfg.seed)

    tune_path, tune_fs = storage.train_storage(root)  # Tune's experiment state goes to the same storage
    path = storage.train_storage(search_dir)[0]
    if resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=tune_fs):
            raise SearchError(f"--resume: no search to resume in {search_dir}; run without --resume to start one")
        log(f"resuming the search in {search_dir}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=tune_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(tcfg),
            # The metric lives in the scheduler or the search algorithm when they are used (Tune refuses both).
            tune_config=tune.TuneConfig(num_samples=tcfg.num_samples, scheduler=scheduler, search_alg=search_alg,
                                        max_concurrent_trials=concurrency,
                                        **({} if tcfg.asha.enabled or search_alg else {"metric": metric, "mode": mode})),
            run_config=tune.RunConfig(name=search_name, storage_path=tune_path, storage_filesystem=tune_fs, verbose=0),
        )
    log(f"search: {tcfg.num_samples} trial(s), up to {concurrency} at once, {max_steps} steps each at most, "
        f"ASHA {'on' if tcfg.asha.enabled else 'off'}, ranked by {metric} ({mode})")
    t0 = time.time()
    printer.start()
    try:
        grid = tuner.fit()
    finally:
        printer.stop()
        try:
            ray.kill(log_queue.actor)
        except Exception:
            pass
    outcome = summarise(grid, max_steps, search_dir, metric, mode)
    log(format_table(outcome))
    log(f"compute: {outcome.steps_run} trial-steps run of {outcome.steps_full} a full search would run "
        f"({100 * (1 - outcome.compute_fraction):.0f}% saved) in {time.time() - t0:.0f}s")
    outcome.mlflow_parent_run_id = parent_id
    if uri and parent_id:
        from rayft.registry.tracking import client

        c = client(uri)
        c.log_metric(parent_id, "trial_steps_run", outcome.steps_run)
        c.log_metric(parent_id, "trial_steps_full", outcome.steps_full)
        if outcome.best and outcome.best.best_eval_loss is not None:
            c.log_metric(parent_id, "best_eval_loss", outcome.best.best_eval_loss)
        if outcome.best and metric != "eval_loss" and outcome.best.best_metric is not None:
            c.log_metric(parent_id, f"best_{metric}", outcome.best.best_metric)
    if outcome.best is None:
        raise SearchError(f"no trial finished with {'an eval loss' if metric == 'eval_loss' else 'a ' + metric}; see the "
                          f"trial errors above")
    from .champion import crown

    crown(cfg, outcome, data, uri, log)
    if uri and parent_id:
        client(uri).set_terminated(parent_id, status="FINISHED")
    return outcome


def task_eval_payload(cfg, log: Callable[[str], None]) -> dict:
    """The golden sample the trials score `tune.metric` on: `eval.search_sample` examples, the same for every
    trial and evaluation step."""
    from rayft.data.pipeline import TokenizerSpec, load_tokenizer
    from rayft.eval.config import EvalError
    from rayft.eval.golden import load_golden
    from rayft.eval.in_training import build_payload

    ecfg, model = cfg.eval, cfg.model
    spec = TokenizerSpec(model.tokenizer_name_or_path, model.revision, model.trust_remote_code)
    try:
        golden = load_golden(cfg.data, ecfg.sources, log=lambda m: None)
        examples = golden.sample(ecfg.search_sample, ecfg.seed)
        payload = build_payload(examples, cfg.tune.metric, ecfg, load_tokenizer(spec),
                                {"name_or_path": spec.name_or_path, "revision": spec.revision,
                                 "trust_remote_code": spec.trust_remote_code}, cfg.data.chat_template)
    except EvalError as e:
        raise SearchError(f"tune.metric {cfg.tune.metric}: {e}") from None
    log(f"search metric: {cfg.tune.metric} on {len(examples)} example(s) of the {golden.describe()} "
        f"(eval.search_sample), scored at every evaluation step")
    return payload


def summarise(grid, max_steps: int, search_dir: str, metric: str = "eval_loss", mode: str = "min") -> SearchOutcome:
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        best = _best(df, "eval_loss", "min")
        best_metric = _best(df, metric, mode)
        steps = int(df["global_step"].max()) if df is not None and "global_step" in df and len(df) else 0
        params = {k: v for k, v in (r.config or {}).items() if k.startswith("train.")}
        trial_id = _trial_id(r)
        trial_dir = storage.join(search_dir, "trials", f"trial-{trial_id}") if trial_id else None
        run_dir = trial_dir if trial_dir and storage.is_file(storage.join(trial_dir, "rayft_run.json")) else None
        rows.append(TrialRow(trial_id or "?", params, best, steps, stopped_early=steps < max_steps and r.error is None,
                             status="ERROR" if r.error else "TERMINATED", run_dir=run_dir, best_metric=best_metric))
    done = [t for t in rows if t.best_metric is not None and t.run_dir]
    sign = 1.0 if mode == "min" else -1.0
    # Ties (a task metric on a small sample often ties) go to the lower eval loss.
    best = min(done, key=lambda t: (sign * t.best_metric, t.best_eval_loss if t.best_eval_loss is not None
                                    else math.inf)) if done else None
    return SearchOutcome(search_dir, rows, best, steps_run=sum(t.steps for t in rows), steps_full=len(rows) * max_steps,
                         metric=metric, mode=mode)


def _best(df, column: str, mode: str) -> Optional[float]:
    if df is None or column not in df:
        return None
    vals = df[column].dropna()
    if not len(vals):
        return None
    return float(vals.min() if mode == "min" else vals.max())


def _trial_id(result) -> Optional[str]:
    """Tune puts the trial id in every reported result."""
    metrics = result.metrics or {}
    return metrics.get("trial_id") or None


def format_table(o: SearchOutcome) -> str:
    keys = sorted({k for t in o.trials for k in t.params})
    task = o.metric != "eval_loss"
    head = (["trial"] + [k.removeprefix("train.") for k in keys] + ["best eval loss"] + ([f"best {o.metric}"] if task
            else []) + ["steps", "stopped early", "status"])
    rows = []
    sign = 1.0 if o.mode == "min" else -1.0
    for t in sorted(o.trials, key=lambda t: (t.best_metric is None, sign * (t.best_metric or 0.0))):
        rows.append([t.trial_id] + [_fmt(t.params.get(k)) for k in keys] + [_fmt(t.best_eval_loss)] +
                    ([_fmt(t.best_metric)] if task else []) +
                    [str(t.steps), "yes" if t.stopped_early else "no", t.status])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if o.best:
        out.append(f"best: trial {o.best.trial_id} (eval loss {_fmt(o.best.best_eval_loss)}"
                   + (f", {o.metric} {_fmt(o.best.best_metric)})" if task else ")"))
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)
