"""`train_loop_per_worker`: what each Ray Train worker runs, top to bottom.

set up -> resume -> (train step -> evaluate -> save checkpoint + report) until the plan's last step.

The loop is driven by a `plan` the driver computed from the data (steps per epoch, total steps, warmup),
so every rank takes the same number of steps and a resumed run follows the same schedule and data order.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

SCORE_NOT_EVALUATED = 1e30  # checkpoints without an eval rank below every evaluated one


class WorkerError(RuntimeError):
    """An error the loop raises on purpose; its message says what is wrong and what to do, so the driver shows
    it instead of Ray's wrapper with every worker's traceback."""


class Preempted(WorkerError):
    """Raised by every rank after the checkpoint a preemption notice asked for: the worker group stops, and Ray
    Train starts it again (on the nodes that remain, or new ones) from that checkpoint."""


@dataclass
class Progress:
    """Where the run stands: exactly what a checkpoint's state.json holds (in this order) and a resume restores."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_eval_loss: Optional[float] = None
    bad_evals: int = 0
    eval_loss: Optional[float] = None
    initial_eval_loss: Optional[float] = None  # of the untrained adapter, so the gain shows in every report
    stopped_early: bool = False  # a resumed run that had stopped early stays stopped


@dataclass
class WorkerState:
    """Everything the steps of one worker share; built by `setup`, then passed to each step."""

    train: Any  # TrainConfig
    plan: dict
    run_dir: str
    tracking: Optional[dict]
    rank: int
    world: int
    device: Any
    engine: Any
    train_rows: Any  # this rank's ray.data iterator over its own fixed shard of the training rows (shards.py)
    eval_rows: Any  # this rank's shard of the eval rows; None when the run has no eval split
    say: Callable[[Any], None]
    process: Any  # psutil.Process, for the memory metrics
    baseline_rss_bytes: int = 0  # this worker's resident memory before the model loaded (a Ray worker idles near 1 GB)
    security: Any = None  # the run's SecurityConfig: how the base is opened, whether checkpoints are encrypted
    progress: Progress = field(default_factory=Progress)
    start_step: int = 0  # where this attempt started: the ETA and the report count from here
    last_saved: Optional[str] = None  # the newest checkpoint known to be intact, for error messages
    attempt_tokens: float = 0.0  # non-pad tokens since this attempt started
    attempt_time_s: float = 0.0  # step time since this attempt started
    loop_start_s: float = 0.0
    last_ray_report_s: float = 0.0  # time.monotonic() of this worker's last ray.train.report
    preemption: Any = None  # PreemptionWatch (preemption.py): a drain of this node or SIGTERM to this worker


@dataclass
class StepResult:
    """One optimizer step, summed over every rank."""

    loss_sum: float
    loss_tokens: float
    nonpad_tokens: float
    examples: float
    time_s: float
    notice_ranks: float = 0.0  # how many ranks had a preemption notice when the step ended
    ray_report_due: bool = True  # rank 0's clock says Ray Train may take a metrics-only report (`report`)


def train_loop_per_worker(config: dict) -> None:
    from .engine import select_ds_accelerator

    # DeepSpeed picks its accelerator once per process: from train.use_gpu, before anything imports it (an inherited
    # DS_ACCELERATOR=cpu must not win on a GPU run).
    try:
        select_ds_accelerator(bool(config["train"]["use_gpu"]))
    except RuntimeError as e:
        raise WorkerError(str(e)) from None
    state = setup(config)
    try:
        resume(state, required=bool(config.get("require_resume")))
        if state.eval_rows is not None and state.start_step == 0:  # a resumed run has it from its checkpoint
            state.progress.initial_eval_loss = evaluate(state)["eval_loss"]
        state.engine.train()
        state.loop_start_s = time.perf_counter()  # the ETA counts training steps, not set-up or the first eval
        per_epoch, gas = state.plan["steps_per_epoch"], state.train.accumulation_steps
        while not finished(state):
            batches = micro_batches(state, skip=state.progress.step_in_epoch * gas)
            while state.progress.step_in_epoch < per_epoch and not finished(state):
                stats = train_step(state, [next(batches) for _ in range(gas)])
                noticed_at_s = preemption_noticed_at(state, stats)
                metrics = step_metrics(state, stats) if logging_due(state) else {}
                evaluated = eval_due(state)
                if evaluated:
                    metrics.update(evaluate(state))
                    metrics.update(task_metrics(state, config.get("task_eval")))
                    observe_eval_loss(state, metrics["eval_loss"])
                epoch_done = advance_position(state)
                # A node about to go: this step's checkpoint is the one the run resumes from, so it loses nothing.
                with_checkpoint = evaluated or checkpoint_due(state) or noticed_at_s is not None
                if metrics or with_checkpoint:
                    report(state, metrics, with_checkpoint, to_ray_train=stats.ray_report_due)
                if noticed_at_s is not None and not finished(state):
                    stop_for_preemption(state, stats, noticed_at_s)
                if epoch_done:  # the next epoch reads its rows from the start
                    break
    finally:
        state.preemption.uninstall()


# ------------------------------------------------------------------------------------------ set up


def setup(config: dict) -> WorkerState:
    """Configs, this worker's place in the group, the DeepSpeed engine and the data shards."""
    import psutil
    import ray.train
    import torch

    from rayft.data.storage import StorageConfig, apply_storage_settings
    from rayft.models.config import ModelConfig
    from rayft.security.config import SecurityConfig

    from .config import TrainConfig
    from .engine import build_engine
    from .preemption import PreemptionWatch
    from .shards import shard_name

    # This worker may run on another node: it reaches the run folder through the same endpoint as the driver.
    apply_storage_settings(StorageConfig.model_validate(config.get("storage") or {}))
    model_cfg = ModelConfig.model_validate(config["model"])
    train = TrainConfig.model_validate(config["train"])
    # The run's security section (the key itself is read on this node, from key_env or key_file, never passed).
    security = SecurityConfig.model_validate(config.get("security") or {})
    plan = config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = _messenger(config.get("progress"), rank)
    device = torch.device("cuda", ctx.get_local_rank()) if train.use_gpu else torch.device("cpu")
    if not train.use_gpu:
        return_freed_tensors_to_the_os(train.deepspeed.zero_stage)
    # The baseline is taken with the libraries already imported: what follows is the model's and the engine's.
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    preemption = PreemptionWatch(warn=say)
    preemption.install()  # before the model loads: a SIGTERM during loading is noticed at the first step
    process = psutil.Process()
    baseline_rss = process.memory_info().rss
    engine = build_engine(model_cfg, train, plan["warmup_steps"], plan["total_steps"], device,
                          log=say if rank == 0 else (lambda _: None), security=security)
    return WorkerState(
        train=train, plan=plan, run_dir=config["run_dir"], tracking=config.get("tracking"), rank=rank, world=world,
        device=device, engine=engine, train_rows=ray.train.get_dataset_shard(shard_name("train", rank)),
        eval_rows=ray.train.get_dataset_shard(shard_name("eval", rank)) if plan["has_eval"] else None, say=say,
        process=process, baseline_rss_bytes=baseline_rss, security=security, preemption=preemption)


def return_freed_tensors_to_the_os(zero_stage: int) -> None:
    """Large tensors get their own memory mapping, unmapped when freed: 128 KiB and more under ZeRO-3, 8 MiB and more
    otherwise.

    glibc otherwise raises that threshold (up to 32 MiB) as large blocks are freed and keeps freed heap memory for
    reuse: a CPU worker that builds a model, gathers ZeRO-3 weights layer by layer and frees activations each step
    kept hundreds of MB of freed tensors resident (measured: a 0.1B model's ZeRO-3 step peaked at +823 MiB with the
    default, +471 MiB with 128 KiB). But a fresh mapping is zeroed by the kernel each time: with 128 KiB every
    activation of a small model was one, and the tiny model trained 22-37% slower. ZeRO-3 is chosen for memory, so
    it keeps 128 KiB (a 1B model's peak per worker: 2522 MiB, 2821 MiB with 8 MiB); the other stages keep small
    tensors on the reused heap (ZeRO-0's peak on that model: 4509 MiB, 4265 with 128 KiB). No-op where glibc's
    mallopt is missing."""
    import ctypes

    threshold = 128 * 1024 if zero_stage == 3 else 8 * 2**20
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD: fixed, so no longer raised on frees
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------ resume


def resume(state: WorkerState, required: bool) -> None:
    """Continue from the newest intact checkpoint, if there is one: engine, progress and this rank's RNG.

    Ray hands back the latest reported checkpoint (worker restart or re-run driver). The run folder is searched
    too: a worker killed between writing a checkpoint and Ray registering it must not send the run back to
    step 0, and a damaged checkpoint falls back to the previous intact one.
    """
    import ray.train

    from rayft.security.config import load_key

    from .checkpoint import (
        ENGINE_DIR,
        ENGINE_TAG,
        checkpoint_dir_name,
        choose_resume_checkpoint,
        opened_checkpoint,
        read_state,
        set_rng_state,
    )

    latest = ray.train.get_checkpoint()
    # A checkpoint in object storage is downloaded into this worker's own `scratch` (Ray's latest and the bucket's
    # alike): load everything before it goes away.
    with tempfile.TemporaryDirectory(prefix="rayft-resume-") as scratch:
        path = choose_resume_checkpoint(_local_copy(latest, scratch), state.run_dir,
                                        warn=lambda m: state.say("warning: " + m), scratch=scratch)
        if path is None and required:
            raise WorkerError(f"--resume: no intact checkpoint under {state.run_dir}")
        if path is not None:
            saved = read_state(path)
            if saved["world_size"] != state.world:
                raise WorkerError(
                    f"{path} was written by {saved['world_size']} workers and this run has {state.world}; the data "
                    f"order and DeepSpeed state depend on it. Set train.num_workers: {saved['world_size']} or use a "
                    f"new run name")
            # An encrypted checkpoint is read from a private decrypted copy, removed once the engine has it.
            with opened_checkpoint(path, lambda: load_key(state.security)) as plain:
                state.engine.load_checkpoint(os.path.join(plain, ENGINE_DIR), tag=ENGINE_TAG,
                                             load_module_strict=False)
            for name in (f.name for f in fields(Progress) if f.name in saved):
                setattr(state.progress, name, saved[name])
            with open(os.path.join(path, "rng", f"rank{state.rank}.json")) as f:
                set_rng_state(json.load(f))
            # Named by its step: Ray's copy of a checkpoint in object storage is a temporary folder.
            state.say(f"resumed from {checkpoint_dir_name(state.progress.global_step)} at step "
                      f"{state.progress.global_step}")
    state.last_saved = path
    state.start_step = state.progress.global_step


def _local_copy(checkpoint, scratch: str) -> Optional[str]:
    """Ray's latest checkpoint as a local folder: itself on a local filesystem, else a download into this worker's
    `scratch`. Not `Checkpoint.as_directory()`: its download folder is shared by the workers of a node, and a second
    worker that takes the folder's lock after the first one finished downloads again over the files the first is
    reading (seen: two workers restarted on one node, one read an empty state.json and the group then hung)."""
    if checkpoint is None:
        return None
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return checkpoint.to_directory(os.path.join(scratch, "ray-latest"))


# -------------------------------------------------------------------------------------- train step


def finished(state: WorkerState) -> bool:
    return state.progress.global_step >= state.plan["total_steps"] or state.progress.stopped_early


def micro_batches(state: WorkerState, skip: int):
    """This rank's micro batches of one epoch, from the `skip`-th on.

    Each rank reads only its own fixed shard of the ordered rows (train/shards.py): every shard has the same length,
    and a resumed run, which cuts the same shards, sees exactly the rows it would have seen.
    """
    for i, rows in enumerate(state.train_rows.iter_batches(batch_size=state.train.micro_batch_size,
                                                           batch_format="numpy", drop_last=True)):
        if i >= skip:
            yield rows


def train_step(state: WorkerState, window: list) -> StepResult:
    """One optimizer step over a window of `accumulation_steps` micro batches."""
    from .loss import count_loss_tokens

    t0 = time.perf_counter()
    # Normalise by the unmasked tokens of the whole window on all ranks: every assistant token weighs the same
    # however the tokens fall into micro batches. DeepSpeed averages gradients over ranks, hence the factor `world`.
    local_tokens = sum(count_loss_tokens(lab) for rows in window for lab in rows["labels"])
    local_nonpad = sum(int(rows["num_tokens"].sum()) for rows in window)
    local_examples = sum(int(rows["num_examples"].sum()) for rows in window)
    tokens, nonpad, examples = all_sum(state, local_tokens, local_nonpad, local_examples)
    loss_sum = 0.0
    for rows in window:
        loss = token_loss_sum(state, rows)
        loss_sum += float(loss.detach())
        state.engine.backward(loss * state.world / max(tokens, 1.0), scale_wrt_gas=False)
        state.engine.step()
    # The preemption flag rides on this all-reduce: every rank learns at the same step that one of them was told.
    # So does rank 0's view of whether a metrics-only report to Ray Train is due: every rank must make the same
    # number of reports (each one is a barrier), so one clock decides.
    report_due = state.rank == 0 and time.monotonic() - state.last_ray_report_s >= ray_report_interval_s()
    loss_sum, notice_ranks, report_due = all_sum(state, loss_sum, 1.0 if state.preemption.notice() else 0.0,
                                                 1.0 if report_due else 0.0)
    state.progress.global_step += 1
    state.progress.step_in_epoch += 1
    dt = time.perf_counter() - t0
    state.attempt_tokens += nonpad
    state.attempt_time_s += dt
    return StepResult(loss_sum, tokens, nonpad, examples, dt, notice_ranks, report_due > 0)


def token_loss_sum(state: WorkerState, rows: dict):
    from rayft.data.pack import collate

    from .loss import sum_token_loss

    batch = {k: v.to(state.device)
             for k, v in collate(rows, state.plan["pad_token_id"], state.plan["packed"]).items()}
    labels = batch.pop("labels")
    # No KV cache: transformers derives the block-diagonal mask of packed rows only when none is built.
    return sum_token_loss(state.engine(**batch, use_cache=False).logits, labels)


def all_sum(state: WorkerState, *values: float) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=state.device)  # NCCL on GPUs reduces device tensors only
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(state: WorkerState, *values: float) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def logging_due(state: WorkerState) -> bool:
    step = state.progress.global_step
    return step % state.train.logging_every_n_steps == 0 or step == state.plan["total_steps"]


def step_metrics(state: WorkerState, step: StepResult) -> dict:
    import torch

    grad_norm = state.engine.get_global_grad_norm()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    above = float(peak_rss - state.baseline_rss_bytes)
    most, least = all_reduce_max(state, above, -above)
    metrics = {
        "loss": step.loss_sum / max(step.loss_tokens, 1.0), "learning_rate": float(state.engine.get_lr()[0]),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "tokens_per_s": step.nonpad_tokens / step.time_s, "samples_per_s": step.examples / step.time_s,
        "step_time_s": step.time_s,
        "memory_rss_mb": state.process.memory_info().rss / 2**20,
        "peak_rss_mb": peak_rss / 2**20,
        # What the model, the engine and training added to each worker's peak (max and min over the workers): the
        # figure `rayft plan` plans on CPU (benchmarks/memory_plan.py compares them).
        "peak_rss_over_baseline_mb": most / 2**20, "peak_rss_over_baseline_mb_min": -least / 2**20,
        "train_tokens": state.attempt_tokens, "train_time_s": state.attempt_time_s,
        "loop_time_s": time.perf_counter() - state.loop_start_s,  # wall clock: steps, reports, checkpoints, evals
    }
    if torch.cuda.is_available() and state.train.use_gpu:
        metrics["gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return metrics


def advance_position(state: WorkerState) -> bool:
    """After a step: True when it ended the epoch. The checkpoint written next must then say that the next
    step starts a new epoch."""
    p = state.progress
    if p.step_in_epoch != state.plan["steps_per_epoch"]:
        return False
    p.epoch += 1
    p.step_in_epoch = 0
    return True


# ---------------------------------------------------------------------------------------- evaluate


def eval_due(state: WorkerState) -> bool:
    step, every = state.progress.global_step, state.train.eval_every_n_steps
    return state.eval_rows is not None and bool((every and step % every == 0) or step == state.plan["total_steps"])


def evaluate(state: WorkerState) -> dict:
    """Eval loss over the whole eval split, per unmasked token of all ranks."""
    import torch

    from .loss import count_loss_tokens
    from .shards import eval_forwards

    state.engine.eval()
    loss_sum = tokens = 0.0
    forwards = 0
    with torch.no_grad():
        for rows in state.eval_rows.iter_batches(batch_size=state.train.micro_batch_size, batch_format="numpy"):
            loss_sum += float(token_loss_sum(state, rows))
            tokens += sum(count_loss_tokens(labels) for labels in rows["labels"])
            forwards += 1
        # ZeRO-3 forwards are collective: a rank whose eval shard holds fewer batches runs as many forwards as the
        # longest shard, on a one-token row without labels whose result is not counted.
        for _ in range(eval_forwards(state.plan["eval_rows"], state.world, state.train.micro_batch_size) - forwards):
            token_loss_sum(state, _padding_rows(state.plan["pad_token_id"]))
    state.engine.train()
    loss_sum, tokens = all_sum(state, loss_sum, tokens)
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def _padding_rows(pad_token_id: int) -> dict:
    import numpy as np

    from rayft.data.pack import IGNORE_INDEX

    return {"input_ids": np.array([[pad_token_id]]), "labels": np.array([[IGNORE_INDEX]]),
            "position_ids": np.array([[0]])}


def task_metrics(state: WorkerState, payload: Optional[dict]) -> dict:
    """A search's task metric (`tune.metric`) on its sample of the golden set; nothing when the search ranks trials
    by eval loss. Every rank takes part (rayft/eval/in_training.py)."""
    if not payload:
        return {}
    from rayft.data.pipeline import TokenizerSpec, load_tokenizer
    from rayft.eval.in_training import score_sample

    tokenizer = load_tokenizer(TokenizerSpec(**payload["tokenizer"]))
    state.engine.eval()
    try:
        return score_sample(state.engine.module, tokenizer, payload, state.rank, state.world,
                            lambda *values: all_sum(state, *values),
                            zero3=state.train.deepspeed.zero_stage == 3 and state.world > 1)
    finally:
        state.engine.train()


def observe_eval_loss(state: WorkerState, eval_loss: float) -> None:
    """Best loss and early stopping after an evaluation."""
    from .early_stopping import observe_eval

    p, stopping = state.progress, state.train.early_stopping
    p.eval_loss = eval_loss
    p.best_eval_loss, p.bad_evals, p.stopped_early = observe_eval(
        p.best_eval_loss, p.bad_evals, eval_loss, stopping.patience, stopping.threshold)
    if p.stopped_early:
        state.say(f"early stopping at step {p.global_step}: eval loss has not improved for "
                  f"{stopping.patience} evaluations")


# -------------------------------------------------------------------------------------- preemption


def preemption_noticed_at(state: WorkerState, step: StepResult) -> Optional[float]:
    """When the first rank was told its node is about to go (time.time()), or None when no rank was."""
    if not step.notice_ranks:
        return None
    own = state.preemption.notice()
    (minus_earliest,) = all_reduce_max(state, -own.seen_at_s if own else -math.inf)
    return -minus_earliest


def stop_for_preemption(state: WorkerState, step: StepResult, noticed_at_s: float) -> None:
    """After the checkpoint a preemption notice asked for: every rank stops, so Ray Train starts the group again
    from it, on the nodes that remain or new ones, instead of training on until the node is taken."""
    from .checkpoint import checkpoint_dir_name

    own = state.preemption.notice()
    name = checkpoint_dir_name(state.progress.global_step)
    took_s = time.time() - noticed_at_s
    what = own.detail if own is not None else "another worker's node"
    state.say(f"preemption: notice on {int(step.notice_ranks)} of {state.world} worker(s) ({what}); {name} written "
              f"{took_s:.1f}s after the notice; the workers stop and the run resumes from step "
              f"{state.progress.global_step}")
    raise Preempted(f"preempted at step {state.progress.global_step} ({what}); {name} was written for the restart, "
                    f"which counts against train.max_failures: raise it for runs on spot capacity")


# ------------------------------------------------------------------------------------ save + report


def checkpoint_due(state: WorkerState) -> bool:
    step = state.progress.global_step
    return (step % state.train.save_every_n_steps == 0 or step == state.plan["total_steps"]
            or state.progress.stopped_early)


def ray_report_interval_s() -> float:
    """How often a metrics-only report goes to Ray Train: its controller takes one report per worker each time it
    polls the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), and a report made before the previous
    one was taken waits for it. Reporting every step had held a fast loop at one step per poll (measured: the tiny
    model's 20 steps, 1.5 s of compute, took 20 s, the training thread waiting in Ray's report queue 95% of the
    time)."""
    return float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


def report(state: WorkerState, metrics: dict, with_checkpoint: bool, to_ray_train: bool = True) -> None:
    """The step's metrics to MLflow and the driver's terminal (rank 0), then to Ray Train with a checkpoint, or
    without one when `to_ray_train` (at most once per controller poll, see `ray_report_interval_s`; MLflow and the
    terminal get every logging step, and every checkpoint, eval and the last step reach Ray Train and Tune)."""
    from rayft.registry.tracking import log_metrics

    p, total = state.progress, state.plan["total_steps"]
    metrics.update({"global_step": p.global_step, "epoch": p.epoch, "start_step": state.start_step,
                    "total_steps": total, "initial_eval_loss": p.initial_eval_loss,
                    "checkpoint_score": metrics.get("eval_loss", SCORE_NOT_EVALUATED) if with_checkpoint
                    else SCORE_NOT_EVALUATED})
    if state.rank == 0:
        if state.tracking:
            log_metrics(state.tracking["uri"], state.tracking["run_id"], {
                k: v for k, v in metrics.items() if k not in ("checkpoint_score", "total_steps") and v is not None},
                p.global_step)
        state.say({"step": p.global_step, "total": total, "loss": metrics.get("loss"),
                   "tokens_per_s": metrics.get("tokens_per_s"), "eval_loss": metrics.get("eval_loss"),
                   "elapsed_s": time.perf_counter() - state.loop_start_s, "start_step": state.start_step})
    if with_checkpoint:
        save_checkpoint(state, metrics)
    elif to_ray_train:
        import ray.train

        ray.train.report(metrics)
    else:
        return
    state.last_ray_report_s = time.monotonic()


def save_checkpoint(state: WorkerState, metrics: dict) -> None:
    """Write this rank's part of the checkpoint to a local folder and report it; Ray merges every rank's part
    into `<run_dir>/checkpoint_step<N>`."""
    import ray.train

    from rayft.security.config import load_key

    from .checkpoint import checkpoint_dir_name, write_rank_part

    step = state.progress.global_step
    # Encrypted before Ray copies the part to the storage: the plaintext only ever sits in this private folder.
    key = load_key(state.security) if state.security and state.security.encrypt_artifacts else None
    local = tempfile.mkdtemp(prefix=f"rayft-ckpt-r{state.rank}-")
    name = checkpoint_dir_name(step)
    try:
        try:
            write_rank_part(state.engine, local, state.rank, state.world, state.train.deepspeed.zero_stage,
                            asdict(state.progress), key=key)
        except OSError as e:
            raise WorkerError(f"cannot write checkpoint step {step} to the local folder "
                              f"{local} ({e}); free space in {tempfile.gettempdir()}") from e
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name)
        except OSError as e:
            # Ray copies into the destination folder directly; a half-copied folder has no complete set
            # of manifests, so it is never resumed from. Say where, and what is still safe.
            previous = f"the last intact one is {state.last_saved}" if state.last_saved else "none was saved before"
            raise WorkerError(
                f"cannot write checkpoint step {step} to {os.path.join(state.run_dir, name)} "
                f"({type(e).__name__}: {e}). The checkpoints written before it are untouched ({previous}); "
                f"make the storage writable (permissions, free space, the folder's name taken by a file) "
                f"and run again with --resume") from e
        state.last_saved = os.path.join(state.run_dir, name)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _messenger(queue, rank: int):
    """Messages for the driver's terminal (worker output is not forwarded): text or progress dicts."""

    def say(message) -> None:
        if rank != 0 and not (isinstance(message, str) and message.startswith("warning")):
            return
        if queue is None:
            print(message, flush=True)
            return
        try:
            queue.put_nowait(message)
        except Exception:  # a full or gone queue must never stop training
            print(message, flush=True)

    return say
