"""`train_loop_per_worker`: what each Ray Train worker runs, top to bottom.

build engine -> resume -> loop (forward, backward, step) -> evaluate -> checkpoint + report.

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

SCORE_NOT_EVALUATED = 1e30  # checkpoints without an eval rank below every evaluated one


class WorkerError(RuntimeError):
    """An error the loop raises on purpose; its message says what is wrong and what to do, so the driver shows
    it instead of Ray's wrapper with every worker's traceback."""


def train_loop_per_worker(config: dict) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["train"]["use_gpu"] else "cpu")
    import psutil
    import ray.train
    import torch
    import torch.distributed as dist

    from rayft.data.pack import collate
    from rayft.models.config import ModelConfig
    from rayft.registry.tracking import log_metrics

    from .checkpoint import (
        ENGINE_DIR,
        ENGINE_TAG,
        checkpoint_dir_name,
        choose_resume_checkpoint,
        read_state,
        set_rng_state,
        write_rank_part,
    )
    from .config import TrainConfig
    from .early_stopping import observe_eval
    from .engine import build_engine
    from .loss import count_loss_tokens, sum_token_loss

    model_cfg = ModelConfig.model_validate(config["model"])
    train = TrainConfig.model_validate(config["train"])
    plan, tracking, run_dir = config["plan"], config.get("tracking"), config["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    say = _messenger(config.get("progress"), rank)
    gas, micro = train.accumulation_steps, train.micro_batch_size

    # ---- build engine
    device = torch.device("cuda", ctx.get_local_rank()) if train.use_gpu else torch.device("cpu")
    engine = build_engine(model_cfg, train, plan["warmup_steps"], plan["total_steps"], device,
                          log=say if rank == 0 else (lambda _: None))

    # ---- resume: Ray hands back the latest reported checkpoint (worker restart or re-run driver);
    # a damaged one falls back to the previous intact checkpoint in the run folder.
    state = {"global_step": 0, "epoch": 0, "step_in_epoch": 0, "best_eval_loss": None, "bad_evals": 0,
             "eval_loss": None, "initial_eval_loss": None, "stopped_early": False}
    # The run folder is searched too: a worker killed between writing a checkpoint and Ray registering it
    # must not send the run back to step 0.
    latest = ray.train.get_checkpoint()
    with (latest.as_directory() if latest is not None else _nullpath()) as latest_dir:
        path = choose_resume_checkpoint(latest_dir, run_dir, warn=lambda m: say("warning: " + m))
        if path is None and config.get("require_resume"):
            raise WorkerError(f"--resume: no intact checkpoint under {run_dir}")
        if path is not None:
            saved = read_state(path)
            if saved["world_size"] != world:
                raise WorkerError(
                    f"{path} was written by {saved['world_size']} workers and this run has {world}; the data order "
                    f"and DeepSpeed state depend on it. Set train.num_workers: {saved['world_size']} or use a new run name")
            engine.load_checkpoint(os.path.join(path, ENGINE_DIR), tag=ENGINE_TAG, load_module_strict=False)
            state.update({k: v for k, v in saved.items() if k in state})
            with open(os.path.join(path, "rng", f"rank{rank}.json")) as f:
                set_rng_state(json.load(f))
            say(f"resumed from {os.path.basename(path)} at step {state['global_step']}")
    last_saved = [path]  # the newest checkpoint known to be intact, for error messages
    start_step = state["global_step"]

    train_rows = ray.train.get_dataset_shard("train")
    eval_rows = ray.train.get_dataset_shard("eval") if plan["has_eval"] else None

    def micro_batches(skip: int):
        # Every rank reads the same ordered rows and keeps every world-th one: a deterministic shard,
        # so a resumed run sees exactly the rows it would have seen.
        for i, rows in enumerate(train_rows.iter_batches(batch_size=micro * world, batch_format="numpy", drop_last=True)):
            if i >= skip:
                yield {k: v[rank::world] for k, v in rows.items()}

    def all_sum(*values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL on GPUs reduces device tensors only
        dist.all_reduce(t)
        return t.tolist()

    def token_loss_sum(rows):
        batch = {k: v.to(device) for k, v in collate(rows, plan["pad_token_id"], plan["packed"]).items()}
        labels = batch.pop("labels")
        # No KV cache: transformers derives the block-diagonal mask of packed rows only when none is built.
        return sum_token_loss(engine(**batch, use_cache=False).logits, labels)

    def evaluate() -> dict:
        engine.eval()
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for rows in eval_rows.iter_batches(batch_size=micro * world, batch_format="numpy"):
                mine = {k: v[rank::world] for k, v in rows.items()}
                weight = 1.0
                if len(mine["input_ids"]) == 0:  # ZeRO-3 forwards are collective: every rank must run one
                    mine, weight = {k: v[:1] for k, v in rows.items()}, 0.0
                loss_sum += weight * float(token_loss_sum(mine))
                tokens += weight * sum(count_loss_tokens(labels) for labels in mine["labels"])
        engine.train()
        loss_sum, tokens = all_sum(loss_sum, tokens)
        loss = loss_sum / max(tokens, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}

    def save_and_report(metrics: dict, with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        local = tempfile.mkdtemp(prefix=f"rayft-ckpt-r{rank}-")
        name = checkpoint_dir_name(state["global_step"])
        try:
            try:
                write_rank_part(engine, local, rank, world, train.deepspeed.zero_stage, dict(state))
            except OSError as e:
                raise WorkerError(f"cannot write checkpoint step {state['global_step']} to the local folder "
                                   f"{local} ({e}); free space in {tempfile.gettempdir()}") from e
            try:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                                 checkpoint_dir_name=name)
            except OSError as e:
                # Ray copies into the destination folder directly; a half-copied folder has no complete set
                # of manifests, so it is never resumed from. Say where, and what is still safe.
                previous = f"the last intact one is {last_saved[0]}" if last_saved[0] else "none was saved before"
                raise WorkerError(
                    f"cannot write checkpoint step {state['global_step']} to {os.path.join(run_dir, name)} "
                    f"({type(e).__name__}: {e}). The checkpoints written before it are untouched ({previous}); "
                    f"make the storage writable (permissions, free space, the folder's name taken by a file) "
                    f"and run again with --resume") from e
            last_saved[0] = os.path.join(run_dir, name)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    # ---- the loop
    total, per_epoch = plan["total_steps"], plan["steps_per_epoch"]
    # Eval loss of the untrained adapter, carried in every report so the gain is visible in the result.
    initial_eval_loss = state.get("initial_eval_loss")
    if eval_rows is not None and start_step == 0:
        initial_eval_loss = evaluate()["eval_loss"]
    state["initial_eval_loss"] = initial_eval_loss
    engine.train()
    proc = psutil.Process()
    attempt_tokens, attempt_time_s = 0.0, 0.0  # non-pad tokens and step time since this attempt started
    stop = state["stopped_early"]  # a resumed run that had stopped early stays stopped
    t_start = time.perf_counter()
    while state["global_step"] < total and not stop:
        epoch_done = False
        batches = micro_batches(skip=state["step_in_epoch"] * gas)
        while state["step_in_epoch"] < per_epoch and state["global_step"] < total:
            t0 = time.perf_counter()
            window = [next(batches) for _ in range(gas)]
            # Normalise by the unmasked tokens of the whole window on all ranks: every assistant token
            # weighs the same however the tokens fall into micro batches. DeepSpeed averages gradients
            # over ranks, hence the factor `world`.
            local_tokens = sum(count_loss_tokens(lab) for rows in window for lab in rows["labels"])
            local_nonpad = sum(int(rows["num_tokens"].sum()) for rows in window)
            local_examples = sum(int(rows["num_examples"].sum()) for rows in window)
            tokens, nonpad, examples = all_sum(local_tokens, local_nonpad, local_examples)
            loss_sum = 0.0
            for rows in window:
                loss = token_loss_sum(rows)
                loss_sum += float(loss.detach())
                engine.backward(loss * world / max(tokens, 1.0), scale_wrt_gas=False)
                engine.step()
            (loss_sum,) = all_sum(loss_sum)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            step = state["global_step"]
            dt = time.perf_counter() - t0
            attempt_tokens += nonpad
            attempt_time_s += dt

            metrics = {}
            if step % train.logging_every_n_steps == 0 or step == total:
                grad_norm = engine.get_global_grad_norm()
                metrics = {
                    "loss": loss_sum / max(tokens, 1.0), "learning_rate": float(engine.get_lr()[0]),
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "tokens_per_s": nonpad / dt, "samples_per_s": examples / dt, "step_time_s": dt,
                    "memory_rss_mb": proc.memory_info().rss / 2**20,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "train_tokens": attempt_tokens, "train_time_s": attempt_time_s,
                }
                if torch.cuda.is_available() and train.use_gpu:
                    metrics["gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            evaluated = eval_rows is not None and (
                (train.eval_every_n_steps and step % train.eval_every_n_steps == 0) or step == total)
            if evaluated:
                metrics.update(evaluate())
                state["eval_loss"] = metrics["eval_loss"]
                state["best_eval_loss"], state["bad_evals"], stop = observe_eval(
                    state["best_eval_loss"], state["bad_evals"], metrics["eval_loss"],
                    train.early_stopping.patience, train.early_stopping.threshold)
                state["stopped_early"] = stop
                if stop:
                    say(f"early stopping at step {step}: eval loss has not improved for "
                        f"{train.early_stopping.patience} evaluations")
            epoch_done = state["step_in_epoch"] == per_epoch
            if epoch_done:  # the checkpoint below must say: next step starts a new epoch
                state["epoch"] += 1
                state["step_in_epoch"] = 0
            checkpoint = evaluated or step % train.save_every_n_steps == 0 or step == total or stop
            if metrics or checkpoint:
                metrics.update({"global_step": step, "epoch": state["epoch"], "start_step": start_step,
                                "total_steps": total, "initial_eval_loss": initial_eval_loss,
                                "checkpoint_score": metrics.get("eval_loss", SCORE_NOT_EVALUATED) if checkpoint
                                else SCORE_NOT_EVALUATED})
                if rank == 0:
                    if tracking:
                        log_metrics(tracking["uri"], tracking["run_id"], {
                            k: v for k, v in metrics.items()
                            if k not in ("checkpoint_score", "total_steps") and v is not None}, step)
                    say({"step": step, "total": total, "loss": metrics.get("loss"),
                         "tokens_per_s": metrics.get("tokens_per_s"), "eval_loss": metrics.get("eval_loss"),
                         "elapsed_s": time.perf_counter() - t_start, "start_step": start_step})
                save_and_report(metrics, with_checkpoint=checkpoint)
            if stop or epoch_done:
                break


class _nullpath:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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
