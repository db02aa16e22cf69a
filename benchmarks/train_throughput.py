"""Training throughput: rayft (1 and 2 workers) against the common baseline, and Ray Train's overhead.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--workdir runs/bench]

Same tiny model, same sample data, same number of optimizer steps, same LoRA and learning rate:

- baseline: Hugging Face `Trainer` + PEFT, single process, examples padded to `max_seq_length`
  (`padding="max_length"`, the common recipe), micro batch and accumulation as in rayft;
- padding-free baseline: the same `Trainer` + PEFT with `DataCollatorWithFlattening` (each micro batch's
  examples concatenated into one row, positions restarting per example: what Hugging Face's stack and TRL's
  `padding_free` do today), same rows, same steps;
- rayft: `run_training` (Ray Train + DeepSpeed ZeRO-2, packed rows) with 1 and with 2 workers;
- bare: one process running the same DeepSpeed engine (`train.engine.build_engine`) over the same packed
  rows, no Ray: rayft 1 worker against it is Ray Train's overhead.

Reported per run: non-pad tokens/s over the optimizer steps (step time only, start-up excluded), the
peak resident memory of each training process, the loop's wall clock (steps plus everything between them:
fetching rows, reports, the final checkpoint for rayft), and the load average before and after. Goals: rayft with 1
worker >= 1.0x the padding-free baseline's non-pad tokens/s; Ray Train overhead <= 15%. Threads are the same on
every side (`--threads`, default 1): a rayft worker reserves one CPU, so Ray sets its torch/OpenMP threads to 1,
and the single-process baselines and the bare loop are given the same number (the earlier comparison let the
bare loop use both cores, which was most of the "overhead"). On a 2-core machine, 2 workers share the same 2
cores as 1 worker does.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def overrides(workdir: Path, model_dir: str, steps: int, name: str, workers: int) -> list[str]:
    return [f"name={name}", f"model.name_or_path={model_dir}", f"storage_path={workdir / 'runs'}",
            f"train.num_workers={workers}", f"train.max_steps={steps}", f"train.save_every_n_steps={steps}",
            "train.micro_batch_size=2", "train.gradient_accumulation_steps=1", "train.learning_rate=5e-3",
            "train.warmup_steps=0", "tracking.enabled=false", "data.eval_fraction=0.0", "data.max_seq_length=512"]


def run_rayft(cfg) -> dict:
    from rayft.train.trainer import run_training

    out = run_training(cfg, log=lambda _: None)
    m = out.metrics
    return {"tokens_per_s": m["train_tokens"] / m["train_time_s"], "steps": m["global_step"],
            "peak_rss_mb_per_process": m["peak_rss_mb"], "wall_s": m["loop_time_s"]}


# ------------------------------------------------------------------------------- child processes


def child_bare(args) -> dict:
    """The same DeepSpeed engine and loss over the same packed rows, one process, no Ray."""
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from rayft.cluster.config import load_config
    from rayft.data.pack import collate
    from rayft.train.engine import build_engine
    from rayft.train.loss import count_loss_tokens, sum_token_loss

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", json.loads(args.overrides))
    table = pq.read_table(args.rows).to_pydict()
    engine = build_engine(cfg.model, cfg.train, 0, args.steps, torch.device("cpu"), log=lambda _: None)
    micro = cfg.train.micro_batch_size
    tokens = 0
    elapsed = 0.0
    wall0 = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        rows = {k: v[step * micro:(step + 1) * micro] for k, v in table.items()}
        n = sum(count_loss_tokens(x) for x in rows["labels"])
        batch = collate(rows, args.pad_id, True)
        labels = batch.pop("labels")
        loss = sum_token_loss(engine(**batch, use_cache=False).logits, labels) / max(n, 1)
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        elapsed += time.perf_counter() - t0
        tokens += sum(rows["num_tokens"])
    return {"tokens_per_s": tokens / elapsed, "steps": args.steps, "peak_rss_mb_per_process": _peak_rss_mb(),
            "wall_s": time.perf_counter() - wall0}


def child_hf(args, flatten: bool = False) -> dict:
    """Hugging Face Trainer + PEFT, one process: examples padded to max_length, or (`flatten`) padding-free with
    DataCollatorWithFlattening."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from rayft.cluster.config import load_config
    from rayft.models.architectures import resolve_target_modules
    from rayft.train.lora import build_lora_config

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", json.loads(args.overrides))
    L = cfg.data.max_seq_length
    table = pq.read_table(args.rows).to_pydict()
    examples = []
    seen = {"tokens": 0}
    if flatten:
        from transformers import DataCollatorWithFlattening

        flat = DataCollatorWithFlattening(return_position_ids=True)
        examples = [{"input_ids": list(ids), "labels": list(labels)} for ids, labels in zip(table["input_ids"],
                                                                                           table["labels"])]

        def collator(batch):
            out = flat(batch)
            seen["tokens"] += int(out["input_ids"].numel())  # one row, no padding
            return out
    else:
        for ids, labels in zip(table["input_ids"], table["labels"]):
            pad = L - len(ids)
            examples.append({"input_ids": list(ids) + [args.pad_id] * pad, "labels": list(labels) + [-100] * pad,
                             "attention_mask": [1] * len(ids) + [0] * pad})

        def collator(batch):
            out = {k: torch.tensor([b[k] for b in batch]) for k in batch[0]}
            seen["tokens"] += int(out["attention_mask"].sum())
            return out

    class Timer(TrainerCallback):
        def __init__(self):
            self.elapsed, self.t0 = 0.0, None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.elapsed += time.perf_counter() - self.t0

    torch.manual_seed(cfg.train.seed)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    model = get_peft_model(base, build_lora_config(cfg.train.lora, resolve_target_modules("auto", base), "llama"))
    timer = Timer()
    trainer = Trainer(
        model=model, train_dataset=examples, data_collator=collator, callbacks=[timer],
        args=TrainingArguments(output_dir=args.out, per_device_train_batch_size=cfg.train.micro_batch_size,
                               gradient_accumulation_steps=1, max_steps=args.steps,
                               learning_rate=cfg.train.learning_rate, use_cpu=True, report_to=[],
                               save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                               remove_unused_columns=False, disable_tqdm=True),
    )
    wall0 = time.perf_counter()
    trainer.train()
    wall_s = time.perf_counter() - wall0
    # The collator's count includes batches fetched per step; with no accumulation, one batch per step.
    return {"tokens_per_s": seen["tokens"] / timer.elapsed, "steps": args.steps,
            "peak_rss_mb_per_process": _peak_rss_mb(), "wall_s": wall_s, "mean_example_tokens": float(np.mean([len(x) for x in table["input_ids"]]))}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _child(kind: str, rows: str, steps: int, pad_id: int, ovr: list[str], out: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--rows", rows, "--steps", str(steps), "--pad-id", str(pad_id),
           "--overrides", json.dumps(ovr), "--out", out, "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--child", choices=["bare", "hf", "hf_flat"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of the single-process runs (a rayft worker "
                   "with one CPU gets 1)")
    p.add_argument("--rows")
    p.add_argument("--pad-id", type=int)
    p.add_argument("--overrides")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_bare(args) if args.child == "bare" else child_hf(args, args.child == "hf_flat")))
        return
    load_before = _loadavg()

    from rayft.cluster.config import load_config
    from rayft.cluster.ray_conn import connect
    from rayft.data.pipeline import TokenizerSpec, prepare
    from rayft.train.tiny_model import build_tiny_model

    workdir = Path(args.workdir).resolve()
    model_dir = str(workdir / "tiny-model")
    if not (Path(model_dir) / "config.json").exists():
        build_tiny_model(model_dir)
    os.chdir(ROOT)
    connect(num_cpus=2)
    results = {}
    base_ovr = overrides(workdir, model_dir, args.steps, "bench", 1)
    cfg = load_config(ROOT / "examples" / "quickstart.yaml", base_ovr)
    spec = TokenizerSpec(model_dir)
    for packing in (True, False):
        prepared = prepare(cfg.data.model_copy(update={"packing": packing}), spec, log=lambda _: None)
        target = workdir / ("packed" if packing else "unpacked")
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        prepared.train.write_parquet(str(target))
        pad_id = prepared.pad_token_id
    rows_packed = str(workdir / "packed")
    rows_unpacked = str(workdir / "unpacked")

    results["baseline (HF Trainer + PEFT, padding=max_length, 1 process)"] = _child(
        "hf", rows_unpacked, args.steps, pad_id, base_ovr, str(workdir / "hf-out"), args.threads)
    results["bare DeepSpeed loop (1 process, packed, no Ray)"] = _child(
        "bare", rows_packed, args.steps, pad_id, base_ovr, str(workdir / "bare-out"), args.threads)
    results["padding-free baseline (HF Trainer + PEFT, DataCollatorWithFlattening)"] = _child(
        "hf_flat", rows_unpacked, args.steps, pad_id, base_ovr, str(workdir / "flat-out"), args.threads)
    for n in (1, 2):
        name = f"bench-w{n}-{int(time.time())}"
        cfg_n = load_config(ROOT / "examples" / "quickstart.yaml", overrides(workdir, model_dir, args.steps, name, n))
        results[f"rayft, {n} worker(s) (Ray Train + DeepSpeed ZeRO-2, packed)"] = run_rayft(cfg_n)

    keys = list(results)
    base = results[keys[0]]["tokens_per_s"]
    bare = results[keys[1]]["tokens_per_s"]
    flat = results[keys[2]]["tokens_per_s"]
    print(f"\n{args.steps} optimizer steps, micro batch 2, tiny Llama, sample data, {os.cpu_count()} CPU cores, "
          f"{args.threads} thread(s) per process; load average before {load_before}, after {_loadavg()}\n")
    print(f"{'run':<72} {'non-pad tok/s':>13} {'x padded':>8} {'x pad-free':>10} {'peak RSS MB/proc':>17} "
          f"{'loop wall s':>11}")
    for k, r in results.items():
        print(f"{k:<72} {r['tokens_per_s']:>13.0f} {r['tokens_per_s'] / base:>8.2f} {r['tokens_per_s'] / flat:>10.2f} "
              f"{r['peak_rss_mb_per_process']:>17.0f} {r['wall_s']:>11.1f}")
    one = results[keys[3]]["tokens_per_s"]
    print(f"\nRay Train overhead (1 worker vs bare loop, same threads): {100 * (1 - one / bare):.1f}% (goal <= 15%)")
    print(f"rayft 1 worker vs the padding-free baseline: {one / flat:.2f}x (goal >= 1.0x)")


if __name__ == "__main__":
    main()
