"""Data at scale: rayft's data stage over a generated mix of JSON Lines and Parquet, on local disk and on an
S3-compatible server (SeaweedFS on loopback, the one the tests use), at one or more sizes.

Printed for each size and place: rows/s through the whole stage (read, validate, dedup, tokenize, pack, report) and
the driver's peak memory, as the driver's own memory (VmRSS less RssShmem, the object store's shared pages it maps
while reading blocks) and as plain VmRSS; then S3 / local ratios. Goals: the driver's peak under 1 GiB at every size,
flat as the data grows; S3 throughput within 20% of local disk.

    .venv/bin/python benchmarks/data_scale.py [--sizes 0.5,2] [--driver-memory-mb 1024] [--read-block-mb 64]

Each size is generated once under a temporary folder (half JSON Lines, half Parquet by bytes; 1 row in 50 a
duplicate, 1 in 200 invalid), uploaded to a bucket, and removed at the end. Each run is a fresh driver process
connected to one local Ray (2 CPUs), so the memory figures are that run's alone. Ray start-up is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

WORDS = ("invoice ledger account expense policy laptop password network vpn reset approve manager payroll report "
         "quarter budget travel receipt hotel flight team project deadline customer ticket escalate refund order "
         "the a to of and in for on with is are be can will should please thanks your our my this that").split()


def _row(rng: random.Random, i: int) -> dict:
    if i % 200 == 7:
        return {"instruction": f"#{i} missing its answer", "output": ""}
    if i % 50 == 3 and i > 50:
        i = 3  # a copy of row 3 of this file
        rng = random.Random(3)
    return {"instruction": f"#{i} " + " ".join(rng.choices(WORDS, k=rng.randint(8, 30))),
            "input": "",
            "output": " ".join(rng.choices(WORDS, k=rng.randint(20, 120)))}


def generate(folder: str, total_bytes: int, files: int = 4, seed: int = 0) -> int:
    """Half the bytes in JSON Lines files, half in Parquet files; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    per_file = total_bytes // files
    for k in range(files):
        rng = random.Random(seed + k)
        if k % 2 == 0:
            size, i = 0, 0
            with open(os.path.join(folder, f"part{k}.jsonl"), "w", encoding="utf-8") as f:
                while size < per_file:
                    line = json.dumps(_row(rng, i)) + "\n"
                    f.write(line)
                    size += len(line)
                    i += 1
            rows += i
        else:
            writer, size, i = None, 0, 0
            while size < per_file:
                batch = [_row(rng, i + j) for j in range(20_000)]
                i += len(batch)
                table = pa.Table.from_pylist(batch)
                writer = writer or pq.ParquetWriter(os.path.join(folder, f"part{k}.parquet"), table.schema)
                writer.write_table(table, row_group_size=20_000)
                size += sum(len(json.dumps(r)) + 1 for r in batch)
            writer.close()
            rows += i
    return rows


PROBE = r"""
import json, os, sys, threading, time
import ray
from rayft.cluster.config import config_from_dict
from rayft.data.pipeline import TokenizerSpec, prepare, write_rejects

address, tok, prefix, driver_mb, block_mb, out = sys.argv[1:7]
ray.init(address=address, logging_level="ERROR", log_to_driver=False)

def memory():
    f = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssShmem")))
    rss, shm = (int(f[k].split()[0]) << 10 for k in ("VmRSS", "RssShmem"))
    return rss, rss - shm

samples, stop = [memory()], threading.Event()
def sample():
    while not stop.is_set():
        samples.append(memory())
        time.sleep(0.01)
sep = "/" if "://" in prefix else os.sep
cfg = config_from_dict({"name": "scale", "model": {"name_or_path": tok}, "data": {
    "sources": [{"name": "jsonl", "path": prefix + sep + "*.jsonl", "schema": "alpaca"},
                {"name": "parquet", "path": prefix + sep + "*.parquet", "schema": "alpaca"}],
    "max_seq_length": 512, "eval_fraction": 0.01, "read_block_mb": int(block_mb),
    "driver_memory_mb": int(driver_mb)}})
before = memory()
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
p = prepare(cfg.data, TokenizerSpec(tok), log=lambda m: None)
rejects = write_rejects(p.rejects, os.path.join(out, "rejects.jsonl"))
secs = time.perf_counter() - t
stop.set()
print("RESULT " + json.dumps({
    "seconds": secs, "rows": p.report["totals"]["read"], "kept": p.report["totals"]["kept"], "rejects": rejects,
    "dups": p.report["totals"]["duplicates_removed"], "train_rows": p.report["splits"]["train"]["rows"],
    "own_before_mb": before[1] / 2**20, "own_peak_mb": max(s[1] for s in samples) / 2**20,
    "rss_peak_mb": max(s[0] for s in samples) / 2**20}))
"""


def run_probe(address: str, tok: str, prefix: str, args, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", PROBE, address, tok, prefix, str(args.driver_memory_mb),
                               str(args.read_block_mb), out], capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the run on {prefix} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,2", help="dataset sizes in GB, comma-separated (default 0.5,2)")
    ap.add_argument("--driver-memory-mb", type=int, default=1024)
    ap.add_argument("--read-block-mb", type=int, default=64)
    ap.add_argument("--places", default="local,s3", help="local, s3 or both (default)")
    args = ap.parse_args()

    import ray

    from rayft.cluster.ray_conn import connect
    from rayft.data import storage
    from rayft.train.tiny_model import build_tokenizer, default_corpus_files
    from tests.s3_server import S3Server

    sizes = [float(x) for x in args.sizes.split(",")]
    places = args.places.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="rayft-data-scale-") as tmp:
        tok = os.path.join(tmp, "tok")
        build_tokenizer(default_corpus_files()).save_pretrained(tok)
        server = None
        env = dict(os.environ, AWS_ACCESS_KEY_ID=os.environ.get("AWS_ACCESS_KEY_ID", "rayft-test-key"),
                   AWS_SECRET_ACCESS_KEY=os.environ.get("AWS_SECRET_ACCESS_KEY", "rayft-test-secret"),
                   AWS_EC2_METADATA_DISABLED="true")
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")})
        if "s3" in places:
            os.makedirs(os.path.join(tmp, "s3"))
            server = S3Server(Path(tmp, "s3"))
            server.start()
            env.update(server.env)
            os.environ.update(server.env)
        try:
            connect(num_cpus=2)
            address = ray.get_runtime_context().gcs_address
            for gb in sizes:
                folder = os.path.join(tmp, f"data-{gb}")
                os.makedirs(folder)
                t = time.perf_counter()
                n = generate(folder, int(gb * 1e9))
                print(f"{gb} GB: {n} rows generated in {time.perf_counter() - t:.0f}s", flush=True)
                for place in places:
                    prefix = folder
                    if place == "s3":
                        bucket = server.create_bucket(f"scale{str(gb).replace('.', '-')}")
                        storage.upload_dir(folder, f"{bucket}/data")  # streamed, file by file
                        prefix = f"{bucket}/data"
                    load = open("/proc/loadavg").read().split()[:3]
                    # After connect(): the driver's environment then holds what a second driver needs to join.
                    r = run_probe(address, tok, prefix, args, dict(os.environ))
                    r.update(size_gb=gb, place=place, loadavg_before=" ".join(load),
                             loadavg_after=" ".join(open("/proc/loadavg").read().split()[:3]))
                    results.append(r)
                    print(f"  {place:<5} {r['seconds']:7.1f}s {r['rows'] / r['seconds']:8.0f} rows/s  driver peak "
                          f"{r['own_peak_mb']:6.0f} MiB own ({r['rss_peak_mb']:.0f} MiB VmRSS)  load "
                          f"{r['loadavg_before']} -> {r['loadavg_after']}", flush=True)
                for name in os.listdir(folder):
                    os.unlink(os.path.join(folder, name))
        finally:
            ray.shutdown()
            if server is not None:
                server.stop()

    print(f"\n{'size':>6} {'place':<6} {'rows':>9} {'seconds':>8} {'rows/s':>8} {'driver own MiB':>15} "
          f"{'VmRSS MiB':>10}  load avg (1/5/15 min, before -> after)")
    for r in results:
        print(f"{r['size_gb']:>5}G {r['place']:<6} {r['rows']:>9} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>8.0f} "
              f"{r['own_peak_mb']:>15.0f} {r['rss_peak_mb']:>10.0f}  {r['loadavg_before']} -> {r['loadavg_after']}")
    for gb in sizes:
        by = {r["place"]: r for r in results if r["size_gb"] == gb}
        if "local" in by and "s3" in by:
            ratio = (by["s3"]["rows"] / by["s3"]["seconds"]) / (by["local"]["rows"] / by["local"]["seconds"])
            print(f"{gb} GB: S3 / local rows/s = {ratio:.2f}x (goal >= 0.80x)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
