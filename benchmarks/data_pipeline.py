"""Data pipeline benchmark: rayft's Ray Data pipeline vs the common Hugging Face `datasets.map` baseline.

Both sides read the same generated files (a mix of alpaca JSONL, OpenAI messages in a CSV, and a
Q&A JSON array), render the same chat template with the same tokenizer, and tokenize to the same
maximum length. The baseline pads every row to `max_length`, as most fine-tuning scripts do; rayft
packs. Printed: rows/s, non-pad tokens/s, padding waste for each, and the ratios.

    .venv/bin/python benchmarks/data_pipeline.py [--rows 100000] [--max-seq-length 512]

Ray start-up is timed separately and not counted in rayft's throughput (a cluster is long-lived); neither is the
driver's tokenizer load, as the baseline's own load is not (the workers' loads are counted).
The baseline runs with `num_proc=1` (the usual script) and `num_proc=2` (all cores of this machine).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
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


def run_rayft(paths: dict, tok_dir: str, max_len: int) -> dict:
    from rayft.cluster.config import config_from_dict
    from rayft.cluster.ray_conn import connect
    from rayft.data.pipeline import TokenizerSpec, load_tokenizer, prepare

    t = time.perf_counter()
    connect(num_cpus=2)
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
    t = time.perf_counter()
    prepared = prepare(cfg.data, TokenizerSpec(tok_dir), log=lambda m: None)
    secs = time.perf_counter() - t
    rep = prepared.report
    tr = rep["splits"]["train"]
    return {"seconds": secs, "ray_start_s": ray_start, "driver_tokenizer_load_s": tok_load, "rows_in": rep["totals"]["read"], "kept": rep["totals"]["kept"],
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
    return {"seconds": secs, "rows_in": rows, "non_pad_tokens": tokens, "padding_waste": 1 - tokens / slots}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--max-seq-length", type=int, default=512)
    args = ap.parse_args()

    from rayft.train.tiny_model import build_tokenizer, default_corpus_files

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = os.path.join(tmp, "tok")
        build_tokenizer(default_corpus_files()).save_pretrained(tok_dir)
        paths = generate(os.path.join(tmp), args.rows)
        print(f"{args.rows} rows generated (alpaca JSONL, OpenAI CSV, Q&A JSON); max_seq_length {args.max_seq_length}")
        results = {"rayft": run_rayft(paths, tok_dir, args.max_seq_length)}
        for n in (1, 2):
            results[f"hf_datasets_num_proc{n}"] = run_baseline(paths, tok_dir, args.max_seq_length, n)

    print(f"\n{'pipeline':<24} {'seconds':>8} {'rows/s':>9} {'non-pad tok/s':>14} {'padding waste':>14}")
    for name, r in results.items():
        print(f"{name:<24} {r['seconds']:>8.1f} {r['rows_in'] / r['seconds']:>9.0f} "
              f"{r['non_pad_tokens'] / r['seconds']:>14.0f} {100 * r['padding_waste']:>13.1f}%")
    ours = results["rayft"]
    print(f"\n(rayft: Ray start-up {ours['ray_start_s']:.1f}s and the driver's tokenizer load "
          f"{ours['driver_tokenizer_load_s']:.1f}s not counted; {ours['kept']} kept of {ours['rows_in']}, "
          f"packed into {ours['rows_out']} blocks)")
    for n in (1, 2):
        base = results[f"hf_datasets_num_proc{n}"]
        ratio = (ours["non_pad_tokens"] / ours["seconds"]) / (base["non_pad_tokens"] / base["seconds"])
        print(f"ratio non-pad tokens/s, rayft / hf_datasets num_proc={n}: {ratio:.2f}x")
    print(json.dumps({k: {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()} for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
