"""Data pipeline benchmark: rayft's Ray Data pipeline vs the common Hugging Face `datasets.map` baseline.

Both sides read the same generated files (a mix of alpaca JSONL, OpenAI messages in a CSV, and a
Q&A JSON array), render the same chat template with the same tokenizer, and tokenize to the same
maximum length. The baseline pads every row to `max_length`, as most fine-tuning scripts do; rayft
packs. Printed: rows/s, non-pad tokens/s, padding waste for each, the CPU seconds each side used (every process:
Ray's, or the baseline's and its pool's), the load average around each run, and the ratios.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 100000] [--max-seq-length 512] [--repeat 3]

Ray start-up is timed separately and not counted in rayft's throughput (a cluster is long-lived), Ray Data's
cluster-wide actors included (a one-row dataset starts them); neither is the driver's tokenizer load, as the
baseline's own load is not. Each rayft run starts a fresh Ray, so its workers' imports and tokenizer loads are
counted. The baseline runs with `num_proc=1` (the usual script) and `num_proc=2`
(all cores of this machine). With `--repeat`, the sides alternate in order; on a shared machine the per-CPU-second
ratio moves less with other work than the wall-clock one.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

WORDS = (
    "invoice ledger account expense policy laptop password network vpn reset approve manager payroll "
    "report quarter budget travel receipt hotel flight team project deadline customer ticket escalate "
    "refund order shipment warehouse inventory contract renewal license seat admin dashboard export "
    "the a to of and in for on with is are be can will should please thanks your our my this that"
).split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def generate(folder: str, rows: int, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    third = rows // 3
    paths = {"alpaca": os.path.join(folder, "kb.jsonl"), "chats": os.path.join(folder, "chats.csv"),
             "qa": os.path.join(folder, "qa.json")}
    with open(paths["alpaca"], "w") as f:
        for i in range(third):
            f.write(json.dumps({"instruction": f"{sentence(rng, 5, 15)} (#{i})", "input": sentence(rng, 0, 20) if i % 3 else "",
                                "output": " ".join(sentence(rng, 5, 25) for _ in range(rng.randint(1, 6)))}) + "\n")
    with open(paths["chats"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["conversation_id", "messages"])
        for i in range(third):
            msgs = [{"role": "system", "content": "You are the helpdesk assistant."}] if i % 2 else []
            for t in range(rng.randint(1, 4)):
                msgs.append({"role": "user", "content": f"{sentence(rng, 4, 20)} (#{i}.{t})"})
                msgs.append({"role": "assistant", "content": " ".join(sentence(rng, 5, 20) for _ in range(rng.randint(1, 3)))})
            w.writerow([f"c{i}", json.dumps(msgs)])
    with open(paths["qa"], "w") as f:
        json.dump([{"question": f"{sentence(rng, 4, 16)} (#{i})", "answer": sentence(rng, 4, 40)} for i in range(rows - 2 * third)], f)
    return paths


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of a process and every process below it (Ray's processes are the driver's)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(name)] = (int(fields[11]) + int(fields[12])) / tick
        children.setdefault(int(fields[1]), []).append(int(name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def self_and_children_cpu_s() -> float:
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_rayft(paths: dict, tok_dir: str, max_len: int) -> dict:
    import ray
    import ray.data

    from rayft.cluster.config import config_from_dict
    from rayft.cluster.ray_conn import connect
    from rayft.data.pipeline import TokenizerSpec, load_tokenizer, prepare

    t = time.perf_counter()
    connect(num_cpus=2)
    # Ray Data starts its cluster-wide actors (stats, autoscaling coordinator) with a cluster's first dataset: part of
    # Ray's start-up on a long-lived cluster, so started here, before the clock, by a one-row dataset.
    ray.data.range(1).materialize()
    ray_start = time.perf_counter() - t
    # The driver's tokenizer (prepare reads its pad token from it) is loaded before the clock starts, as the baseline
    # loads its own before its clock; the workers' loads are counted.
    t = time.perf_counter()
    load_tokenizer(TokenizerSpec(tok_dir))
    tok_load = time.perf_counter() - t
    cfg = config_from_dict({
        "name": "bench", "model": {"name_or_path": tok_dir},
        "data": {"sources": [{"path": paths["alpaca"]}, {"path": paths["chats"]}, {"path": paths["qa"]}],
                 "max_seq_length": max_len, "eval_fraction": 0.0, "dedup": True},
    })
    load = loadavg()
    cpu = tree_cpu_s(os.getpid())
    t = time.perf_counter()
    prepared = prepare(cfg.data, TokenizerSpec(tok_dir), log=lambda m: None)
    secs = time.perf_counter() - t
    cpu = tree_cpu_s(os.getpid()) - cpu
    rep = prepared.report
    tr = rep["splits"]["train"]
    phases = prepared.phase_seconds
    del prepared
    ray.shutdown()  # each run starts cold: new workers, which import and load the tokenizer within the clock
    return {"seconds": secs, "cpu_s": cpu, "load": f"{load} -> {loadavg()}", "ray_start_s": ray_start,
            "driver_tokenizer_load_s": tok_load, "phase_seconds": phases, "rows_in": rep["totals"]["read"], "kept": rep["totals"]["kept"],
            "non_pad_tokens": tr["tokens"] + rep["splits"]["eval"]["tokens"], "padding_waste": tr["padding_waste"],
            "rows_out": tr["rows"]}


def run_baseline(paths: dict, tok_dir: str, max_len: int, num_proc: int) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)

    def to_text(batch, kind):
        texts = []
        n = len(next(iter(batch.values())))
        for i in range(n):
            if kind == "alpaca":
                user = batch["instruction"][i] + (("\n\n" + batch["input"][i]) if batch["input"][i] else "")
                msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": batch["output"][i]}]
            elif kind == "chats":
                msgs = json.loads(batch["messages"][i])
            else:
                msgs = [{"role": "user", "content": batch["question"][i]}, {"role": "assistant", "content": batch["answer"][i]}]
            texts.append(tok.apply_chat_template(msgs, tokenize=False))
        enc = tok(texts, padding="max_length", max_length=max_len, truncation=True)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    load = loadavg()
    cpu = self_and_children_cpu_s()
    t = time.perf_counter()
    rows = tokens = slots = 0
    for kind, path, loader in (("alpaca", paths["alpaca"], "json"), ("chats", paths["chats"], "csv"), ("qa", paths["qa"], "json")):
        ds = datasets.load_dataset(loader, data_files=path, split="train")
        out = ds.map(to_text, batched=True, fn_kwargs={"kind": kind}, remove_columns=ds.column_names,
                     num_proc=num_proc if num_proc > 1 else None)
        import pyarrow.compute as pc

        mask = out.data.column("attention_mask").combine_chunks().flatten()  # every row is max_length long
        rows += len(out)
        tokens += int(pc.sum(mask).as_py())
        slots += len(mask)
    secs = time.perf_counter() - t
    return {"seconds": secs, "cpu_s": self_and_children_cpu_s() - cpu, "load": f"{load} -> {loadavg()}",
            "rows_in": rows, "non_pad_tokens": tokens, "padding_waste": 1 - tokens / slots}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each side, alternating the order (default 1)")
    args = ap.parse_args()

    from rayft.train.tiny_model import build_tokenizer, default_corpus_files

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = os.path.join(tmp, "tok")
        build_tokenizer(default_corpus_files()).save_pretrained(tok_dir)
        paths = generate(os.path.join(tmp), args.rows)
        print(f"{args.rows} rows generated (alpaca JSONL, OpenAI CSV, Q&A JSON); max_seq_length {args.max_seq_length}")
        runs: dict[str, list] = {"rayft": [], "hf_datasets_num_proc1": [], "hf_datasets_num_proc2": []}
        for rep in range(args.repeat):
            # Alternate the order, so a change in the machine's load does not always favour the same side.
            order = ["rayft", 2, 1] if rep % 2 == 0 else [2, 1, "rayft"]
            for side in order:
                if side == "rayft":
                    runs["rayft"].append(run_rayft(paths, tok_dir, args.max_seq_length))
                else:
                    runs[f"hf_datasets_num_proc{side}"].append(run_baseline(paths, tok_dir, args.max_seq_length, side))
                print(f"  run {rep + 1}: {side} done", flush=True)

    print(f"\n{'pipeline':<24} {'run':>3} {'seconds':>8} {'rows/s':>9} {'non-pad tok/s':>14} {'CPU s':>7} "
          f"{'pad waste':>9}  load avg (1/5/15 min, before -> after)")
    for name, rs in runs.items():
        for i, r in enumerate(rs, 1):
            print(f"{name:<24} {i:>3} {r['seconds']:>8.1f} {r['rows_in'] / r['seconds']:>9.0f} "
                  f"{r['non_pad_tokens'] / r['seconds']:>14.0f} {r['cpu_s']:>7.1f} {100 * r['padding_waste']:>8.1f}%  {r['load']}")
    ours = runs["rayft"][0]
    print(f"\n(rayft: Ray start-up {ours['ray_start_s']:.1f}s and the driver's tokenizer load "
          f"{ours['driver_tokenizer_load_s']:.1f}s not counted; {ours['kept']} kept of {ours['rows_in']}, "
          f"packed into {ours['rows_out']} blocks; CPU s: every process of each side, Ray's included)")
    for i, r in enumerate(runs["rayft"], 1):  # where rayft's time goes: each phase ends at a barrier
        util = r["cpu_s"] / (r["seconds"] * (os.cpu_count() or 1))
        print(f"rayft run {i} by phase: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}s"
                                                     for k, v in r["phase_seconds"].items())
              + f"; the CPUs busy {100 * util:.0f}% of the run")

    def tok_per(r, key):
        return r["non_pad_tokens"] / r[key]

    for n in (1, 2):
        base = runs[f"hf_datasets_num_proc{n}"]
        per_run = [tok_per(a, "seconds") / tok_per(b, "seconds") for a, b in zip(runs["rayft"], base)]
        best = max(tok_per(r, "seconds") for r in runs["rayft"]) / max(tok_per(r, "seconds") for r in base)
        cpu = statistics.median(tok_per(r, "cpu_s") for r in runs["rayft"]) / statistics.median(
            tok_per(r, "cpu_s") for r in base)
        print(f"rayft / hf_datasets num_proc={n}: non-pad tokens/s {', '.join(f'{x:.2f}x' for x in per_run)} "
              f"(run by run), {best:.2f}x best against best; per CPU second {cpu:.2f}x (medians)")
    print(json.dumps({k: [{kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in r.items()} for r in v]
                      for k, v in runs.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
