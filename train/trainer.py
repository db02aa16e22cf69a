"""The driver side of `rayft train`: prepare data, plan the steps, run the TorchTrainer, track, register.

Ray must be connected by the caller (cluster/ owns the connection). The run lives in
`<storage_path>/<name>`; running the same config again continues from its last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rayft.data import storage
from rayft.models.config import ModelConfig

from .checkpoint import ADAPTER_DIR, best_and_latest
from .config import TrainConfig

RUN_FILE = "rayft_run.json"


class TrainingError(RuntimeError):
    """Training could not start or did not finish; the message says why."""


def _user_errors() -> tuple:
    from rayft.models.architectures import LoraTargetError

    from .ds_config import DeepSpeedConfigError
    from .model import QuantizationUnavailable

    return (TrainingError, QuantizationUnavailable, LoraTargetError, DeepSpeedConfigError)


USER_ERRORS = _user_errors()  # errors whose message tells the user what to change


@dataclass
class TrainOutcome:
    run_dir: str
    metrics: dict
    checkpoint: Optional[str]
    adapter_dir: Optional[str]
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    registered: Optional[Any] = None
    plan: dict = field(default_factory=dict)


def check_before_start(model: ModelConfig, train: TrainConfig) -> None:
    """Errors a user can fix, found on the driver before any worker starts."""
    from .ds_config import build_deepspeed_config
    from .model import check_quantization

    check_quantization(model, train)
    build_deepspeed_config(train, "float32")  # reads and checks a user JSON
    check_lora_targets(model, train)


def check_lora_targets(model: ModelConfig, train: TrainConfig) -> None:
    """Resolve `target_modules` on a weightless copy of the architecture (meta device: no memory, no download of weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayft.models.architectures import resolve_target_modules

    hf_config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                           trust_remote_code=model.trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=model.trust_remote_code)
    resolve_target_modules(train.lora.target_modules, skeleton)


def plan_steps(train: TrainConfig, train_rows: int) -> dict:
    batches = train_rows // (train.micro_batch_size * train.num_workers)
    per_epoch = batches // train.accumulation_steps
    if per_epoch == 0:
        raise TrainingError(
            f"the training split has {train_rows} rows, fewer than one optimizer step needs "
            f"(train.micro_batch_size x gradient accumulation x num_workers = {train.rows_per_step}); lower "
            f"train.micro_batch_size or train.gradient_accumulation_steps, or add data"
        )
    total = train.max_steps or max(1, math.ceil(train.epochs * per_epoch))
    from .schedule import warmup_steps_for

    return {"steps_per_epoch": per_epoch, "total_steps": total,
            "warmup_steps": warmup_steps_for(train.warmup_steps, train.warmup_ratio, total),
            "rows_per_step": train.rows_per_step, "train_rows": train_rows,
            "rows_left_out_per_epoch": train_rows - per_epoch * train.rows_per_step}


def dataset_fingerprint(*datasets) -> str:
    """A content hash of the prepared rows (token ids and labels, in order)."""
    h = hashlib.blake2b(digest_size=12)
    for ds in datasets:
        if ds is None:
            h.update(b"|none")
            continue
        for b in ds.select_columns(["input_ids", "labels"]).iter_batches(batch_format="numpy", batch_size=4096):
            for ids, lab in zip(b["input_ids"], b["labels"]):
                h.update(ids.astype("int32").tobytes())
                h.update(lab.astype("int32").tobytes())
        h.update(b"|")
    return h.hexdigest()


@dataclass
class TrainingData:
    """The prepared data of a run, shared by every training run of a search."""

    train: Any  # ray.data.Dataset, shuffled once and materialised: a fixed order for every epoch and resume
    eval: Any
    report: dict
    pad_token_id: int
    packed: bool
    fingerprint: str
    plan: dict  # for the config's own train section
    rejects: Any = None  # ray.data.Dataset of rejected rows (written to <run>/rejects.jsonl)
    task_eval: Optional[dict] = None  # a search's task metric and its golden sample (eval/in_training.py)


def plan_for(train: TrainConfig, data: "TrainingData") -> dict:
    plan = plan_steps(train, data.train.count())
    plan.update({"pad_token_id": data.pad_token_id, "packed": data.packed, "has_eval": data.eval is not None,
                 "eval_rows": data.eval.count() if data.eval is not None else 0})
    return plan


def prepare_training_data(cfg, log: Callable[[str], None] = print) -> TrainingData:
    """Check the model settings, run the data pipeline, fix the row order, fingerprint the data."""
    from rayft.data.pipeline import TokenizerSpec, prepare

    train, model = cfg.train, cfg.model
    check_before_start(model, train)
    spec = TokenizerSpec(model.tokenizer_name_or_path, model.revision, model.trust_remote_code)
    prepared = prepare(cfg.data, spec, micro_batch_size=train.micro_batch_size, log=log)
    from rayft.data.pipeline import format_report

    log(format_report(prepared.report))
    train_ds = prepared.train.random_shuffle(seed=train.seed) if train.shuffle else prepared.train
    train_ds = train_ds.materialize()
    data = TrainingData(train_ds, prepared.eval, prepared.report, prepared.pad_token_id, prepared.packed,
                        dataset_fingerprint(train_ds, prepared.eval), {}, prepared.rejects)
    data.plan = plan_for(train, data)
    return data


def run_training(cfg, resume: bool = False, log: Callable[[str], None] = print) -> TrainOutcome:
    """Train one config end to end. `cfg` is the composed RayftConfig (cluster/config.py)."""
    run_dir = storage.join(cfg.storage_root, cfg.name)
    existing = best_and_latest(run_dir)["latest"]  # a folder or a bucket prefix alike
    if resume and existing is None:
        raise TrainingError(f"--resume: {run_dir} holds no intact checkpoint to resume from; run without --resume to start")
    if existing:
        log(f"{run_dir} has checkpoints: continuing from the last one (same run name and storage path)")
    return fit(cfg, prepare_training_data(cfg, log=log), resume=resume, log=log)


@dataclass
class FitRun:
    """What the steps of `fit` share: where the run lives, what it trains on, and its MLflow run."""

    name: str
    storage: str  # an absolute folder or a URI (s3://, gs://)
    run_dir: str  # <storage>/<name>: checkpoints, data report, rejects, run file, adapter; nothing on local disk
    config: dict  # the resolved config, as the run file and MLflow record it
    fingerprint: str
    plan: dict = field(default_factory=dict)
    tracking_uri: Optional[str] = None
    mlflow_run_id: Optional[str] = None


def fit(cfg, data: TrainingData, *, resume: bool = False, log: Callable[[str], None] = print,
        run_name: Optional[str] = None, storage_path: Optional[str] = None, callbacks: tuple = (),
        mlflow_parent: Optional[dict] = None, register: bool = True, mlflow_run_name: Optional[str] = None,
        extra_params: Optional[dict] = None) -> TrainOutcome:
    """One TorchTrainer run over prepared data. A search calls this once per trial with its own
    `run_name`, `storage_path`, Tune's report callback and the search's MLflow run as parent (`mlflow_parent`,
    `mlflow_run_name`, the trial's values as `extra_params`); `rayft run` registers on its own (`register`)."""
    t_start = time.time()
    run = resolve_run(cfg, data, run_name, storage_path)
    write_data_files(run, data, log)
    run.plan = plan_for(cfg.train, data)
    log(describe_plan(run, cfg.train))
    open_tracking(run, cfg, data.report, log, parent=mlflow_parent, mlflow_run_name=mlflow_run_name,
                  extra_params=extra_params)
    _write_run_file(run.run_dir, _run_record(run, "running"))
    result = run_trainer(run, cfg, data, resume=resume, callbacks=callbacks, log=log)
    checkpoint, adapter_dir = collect_adapter(run, result, cfg.security)
    metrics = dict(result.metrics or {})
    registered = finish_tracking(run, cfg, adapter_dir, metrics, time.time() - t_start, register=register, log=log)
    _write_run_file(run.run_dir, _run_record(run, "finished", adapter=adapter_dir, checkpoint=checkpoint,
                                             metrics=_jsonable(metrics)))
    return TrainOutcome(run.run_dir, metrics, checkpoint, adapter_dir, run.mlflow_run_id, run.tracking_uri,
                        registered, run.plan)


def resolve_run(cfg, data: TrainingData, run_name: Optional[str], storage_path: Optional[str]) -> FitRun:
    name = run_name or cfg.name
    root = storage_path or cfg.storage_root
    return FitRun(name, root, storage.join(root, name), cfg.model_dump(mode="json", by_alias=True), data.fingerprint)


def write_data_files(run: FitRun, data: TrainingData, log: Callable[[str], None]) -> None:
    """The data report and every rejected row (with its source, line and reason), in the run folder."""
    storage.make_dirs(run.run_dir)
    report_path = storage.join(run.run_dir, "data_report.json")
    storage.write_text(report_path, json.dumps(data.report, indent=2))
    if data.rejects is not None:
        from rayft.data.pipeline import write_rejects

        rejects_path = storage.join(run.run_dir, "rejects.jsonl")
        n_rejects = write_rejects(data.rejects, rejects_path)
        log(f"data: {n_rejects} rejected row(s) in {rejects_path}, report in {report_path}")


def describe_plan(run: FitRun, train: TrainConfig) -> str:
    plan = run.plan
    return (f"plan: {plan['total_steps']} optimizer steps ({plan['steps_per_epoch']} per epoch of {plan['train_rows']} "
            f"rows, {plan['rows_per_step']} rows per step, warmup {plan['warmup_steps']}) on {train.num_workers} "
            f"worker(s), ZeRO-{train.deepspeed.zero_stage}; dataset fingerprint {run.fingerprint}")


def open_tracking(run: FitRun, cfg, report: dict, log: Callable[[str], None], *, parent: Optional[dict],
                  mlflow_run_name: Optional[str], extra_params: Optional[dict]) -> None:
    """Open the run's MLflow run (nested under `parent`'s, a search's, when given) and attach the data report."""
    if not cfg.tracking.enabled:
        return
    from rayft.registry.tracking import git_commit, open_run, tracking_uri

    uri = parent["uri"] if parent else tracking_uri(cfg.tracking.tracking_uri, run.storage)
    tags = {"git_commit": git_commit(os.getcwd()), "dataset_fingerprint": run.fingerprint,
            "base_model": cfg.model.name_or_path}
    if parent:
        tags["mlflow.parentRunId"] = parent["run_id"]
    params = dict(run.config, trial=extra_params) if extra_params else run.config
    run_id = open_run(uri, cfg.tracking.experiment, mlflow_run_name or run.name, run.storage, params,
                      {k: v for k, v in tags.items() if v})
    _mlflow_client(uri).log_dict(run_id, report, "data_report.json")
    run.tracking_uri, run.mlflow_run_id = uri, run_id
    log(f"MLflow run {run_id} at {uri}")


def torch_backend(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


def build_trainer(run: FitRun, cfg, data: TrainingData, *, resume: bool, callbacks: tuple, progress):
    """The TorchTrainer whose workers run `train_loop_per_worker` over the prepared data."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import train_loop_per_worker
    from .shards import shard_datasets

    train = cfg.train
    storage_path, storage_fs = storage.train_storage(run.storage)
    # One fixed shard of the ordered rows per rank: each worker reads its own rows only (shards.py).
    datasets = shard_datasets(data.train, data.eval, train.num_workers)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": cfg.model.model_dump(mode="json"), "train": train.model_dump(mode="json"), "plan": run.plan,
            "tracking": {"uri": run.tracking_uri, "run_id": run.mlflow_run_id} if run.mlflow_run_id else None,
            "run_dir": run.run_dir, "progress": progress, "require_resume": resume,
            # The endpoint (never the keys) travels with the workers: they list and read the run folder themselves.
            "storage": cfg.storage.model_dump(mode="json"),
            # So does the security section (pickle weights, manifests, checkpoint encryption): where the artifact
            # key is (key_env, key_file), never the key.
            "security": cfg.security.model_dump(mode="json"),
            "task_eval": data.task_eval,  # scored at each evaluation step when the search ranks by a task metric
        },
        # NCCL between GPUs, gloo between CPU workers (said here, not left to Ray's default).
        torch_config=TorchConfig(backend=torch_backend(train.use_gpu)),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker,
                                                           **({"GPU": 1} if train.use_gpu else {})},
                                     placement_strategy=train.placement_strategy),
        run_config=RunConfig(
            name=run.name, storage_path=storage_path, storage_filesystem=storage_fs, callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_best_checkpoints,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets=datasets,
        # Not split again by Ray (its streaming_split differs from run to run): the shards are cut above, so the
        # data order is exactly reproducible on resume.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )


def run_trainer(run: FitRun, cfg, data: TrainingData, *, resume: bool, callbacks: tuple,
                log: Callable[[str], None]):
    """Train, printing the workers' progress as it comes (their own output is not forwarded); a failure ends
    the MLflow run as FAILED and is raised as a TrainingError with the worker's own message."""
    import ray
    from ray.util.queue import Queue

    progress = Queue(maxsize=1000, actor_options=driver_local_actor())
    printer = ProgressPrinter(progress, log)
    printer.start()
    trainer = build_trainer(run, cfg, data, resume=resume, callbacks=callbacks, progress=progress)
    try:
        result = trainer.fit()
    except Exception as e:
        _finish_mlflow(run.tracking_uri, run.mlflow_run_id, "FAILED")
        raise TrainingError(f"training failed: {_failure_message(e)}") from e
    finally:
        printer.stop()
        try:
            ray.kill(progress.actor)
        except Exception:
            pass
    if result.error:
        _finish_mlflow(run.tracking_uri, run.mlflow_run_id, "FAILED")
        raise TrainingError(f"training failed: {_failure_message(result.error)}")
    return result


def collect_adapter(run: FitRun, result, security=None) -> tuple[Optional[str], Optional[str]]:
    """(best checkpoint, its adapter copied to <run_dir>/adapter); the best has the lowest eval loss, else it
    is the latest. Both None when the run saved no checkpoint. A folder and a bucket prefix work alike.

    The copy is finished as an export is: a manifest (anchored in the registry when it is logged) and, with
    security.encrypt_artifacts, encryption; an encrypted checkpoint's adapter is decrypted in a private folder."""
    from rayft.security.artifacts import finish_export
    from rayft.security.config import load_key

    from .checkpoint import decrypt_weights, is_encrypted

    adapter_dir = storage.join(run.run_dir, "adapter")
    storage.delete_dir(adapter_dir)
    found = best_and_latest(run.run_dir)
    chosen = found["best"] or found["latest"]
    if chosen:
        with tempfile.TemporaryDirectory(prefix="rayft-adapter-") as local:
            storage.download_dir(storage.join(chosen, ADAPTER_DIR), local)
            if is_encrypted(local):
                decrypt_weights(local, load_key(security), prefix=f"{ADAPTER_DIR}/")
            finish_export(local, security)
            storage.upload_dir(local, adapter_dir)
    return chosen, (adapter_dir if chosen is not None else None)


def finish_tracking(run: FitRun, cfg, adapter_dir: Optional[str], metrics: dict, duration_s: float, *,
                    register: bool, log: Callable[[str], None]):
    """Attach the adapter and the duration to the MLflow run, register a version (unless `register` is off or
    the config turns registration off), end the run. Returns the registered version or None."""
    if not (run.mlflow_run_id and adapter_dir):
        return None
    uri, run_id = run.tracking_uri, run.mlflow_run_id
    c = _mlflow_client(uri)
    with tempfile.TemporaryDirectory(prefix="rayft-adapter-") as local:  # MLflow logs from a local folder
        c.log_artifacts(run_id, storage.download_dir(adapter_dir, local), artifact_path="adapter")
    c.log_metric(run_id, "duration_s", duration_s)
    registered = None
    model_name = cfg.registered_model_name
    if model_name and register:
        from rayft.registry.tracking import git_commit
        from rayft.registry.versions import register_version

        registered = register_version(uri, model_name, run_id, "adapter", lineage={
            "kind": "adapter", "base_model": cfg.model.name_or_path, "peft_type": "LORA",
            "lora_rank": cfg.train.lora.rank, "dataset_fingerprint": run.fingerprint,
            "eval_loss": metrics.get("eval_loss"), "duration_s": round(duration_s, 1),
            "git_commit": git_commit(os.getcwd())})
        log(f"registered {registered.name} version {registered.version}")
    else:  # not registered (a search's trial): `runs:/<id>/adapter` is anchored all the same
        from rayft.registry.versions import anchor_artifact

        anchor_artifact(uri, run_id, "adapter")
    _finish_mlflow(uri, run_id, "FINISHED")
    return registered


def _run_record(run: FitRun, status: str, **outcome) -> dict:
    return {"name": run.name, "config": run.config, "mlflow_run_id": run.mlflow_run_id,
            "tracking_uri": run.tracking_uri, "dataset_fingerprint": run.fingerprint, "plan": run.plan,
            "status": status, **outcome}


def _failure_message(error) -> str:
    """The loop's own error (it says what to do) when a worker raised one; otherwise Ray's full report."""
    from .loop import WorkerError

    failures = getattr(error, "worker_failures", None) or {}  # ray.train.WorkerGroupError: rank -> exception
    ours = sorted((rank, e) for rank, e in failures.items() if isinstance(e, WorkerError))
    if ours:
        return f"worker {ours[0][0]}: {ours[0][1]}"
    return str(error)


def _mlflow_client(uri):
    from rayft.registry.tracking import client

    return client(uri)


def _finish_mlflow(uri, run_id, status: str) -> None:
    if run_id:
        try:
            _mlflow_client(uri).set_terminated(run_id, status=status)
        except Exception:
            pass


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _write_run_file(run_dir: str, content: dict) -> None:
    storage.write_text(storage.join(run_dir, RUN_FILE), json.dumps(content, indent=2))


def read_run_file(run_dir: str) -> dict:
    """The run file of a run folder, local or in object storage (`s3://bucket/runs/NAME`)."""
    path = storage.join(run_dir, RUN_FILE)
    if not storage.is_file(path):
        raise TrainingError(f"{run_dir} is not a rayft run folder ({RUN_FILE} is missing); give <storage_path>/<name>")
    return json.loads(storage.read_text(path))


def driver_local_actor() -> dict:
    """Actor options for a helper of the driver (the progress queue): no CPU, on the driver's own node, so losing
    a worker node takes the workers it ran, never the driver's view of the run; and restarted elsewhere if its node
    is lost all the same (a driver attached to a node's raylet from another machine): the lines queued then are
    lost, the later ones come through the same handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "max_restarts": -1, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=True)}


class ProgressPrinter:
    """Drains the workers' progress queue and prints `step / total, loss, tokens/s, ETA`."""

    def __init__(self, queue, log):
        self.queue, self.log = queue, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain(block=False)

    def _run(self):
        while not self._stop.is_set():
            self._drain(block=True)

    def _drain(self, block: bool):
        from ray.exceptions import ActorUnavailableError
        from ray.util.queue import Empty

        try:
            msg = self.queue.get(block=block, timeout=0.5 if block else None)
        except Empty:
            return
        except ActorUnavailableError:  # the queue's actor is restarting (its node was lost): wait for it
            if block:
                time.sleep(1.0)
            return
        except Exception as e:  # noqa: BLE001 - the queue's actor is gone for good
            # Progress lines stop; training itself does not depend on them. Said once, and the thread ends
            # instead of failing again every half second.
            if not self._stop.is_set():
                self.log(f"warning: no more progress lines: the progress queue failed ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}); training goes on")
            self._stop.set()
            return
        if isinstance(msg, dict) and "step" in msg:
            done = msg["step"] - msg["start_step"]
            eta = msg["elapsed_s"] / done * (msg["total"] - msg["step"]) if done > 0 else float("nan")
            parts = [f"step {msg['step']}/{msg['total']}"]
            if msg.get("loss") is not None:
                parts.append(f"loss {msg['loss']:.4f}")
            if msg.get("eval_loss") is not None:
                parts.append(f"eval loss {msg['eval_loss']:.4f}")
            if msg.get("tokens_per_s") is not None:
                parts.append(f"{msg['tokens_per_s']:.0f} tokens/s")
            parts.append(f"ETA {eta:.0f}s" if eta == eta else "ETA ?")
            self.log("  ".join(parts))
        else:
            self.log(str(msg))
