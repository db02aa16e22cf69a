"""Evaluation benchmark: `rayft eval` on 500 golden examples of the tiny model, batched (the default, 16 prompts
per generate call), against one prompt at a time (on the first 50 examples: unbatched is slow), in one run.

The golden set is the sample data's questions (support_qa, kb) repeated with a numbered suffix up to 500
conversations; each answer is generated greedily up to eval.max_new_tokens (64). Prints the wall time of each
`rayft eval` subprocess (what a user waits for: start, model load, generation, scoring, writing, MLflow) and the
generation time it reports, and the speed-up of batching (examples per second).

    .venv/bin/python benchmarks/eval_speed.py [--examples 500] [--baseline-examples 50] [--max-new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RAYFT = str(Path(sys.executable).with_name("rayft"))


def golden_file(folder: Path, n: int) -> Path:
    qa = json.loads((ROOT / "examples/data/support_qa.json").read_bytes().decode("utf-8", "replace"))
    questions = [(r["question"], r["answer"]) for r in qa if isinstance(r, dict) and isinstance(r.get("question"), str)
                 and isinstance(r.get("answer"), str) and r["answer"].strip()]
    # the sample data holds deliberately broken rows (the pipeline's rejects): skip what does not decode or parse
    for line in (ROOT / "examples/data/kb.jsonl").read_bytes().decode("utf-8", "replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str) \
                and r["output"].strip():
            questions.append((r["instruction"], r["output"]))
    rows = [{"question": f"{q} (#{i})", "answer": a} for i, (q, a) in
            ((i, questions[i % len(questions)]) for i in range(n))]
    path = folder / "golden.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(folder: Path, model: str, golden: Path, batch_size: int, max_new_tokens: int) -> tuple[float, float, int]:
    cfg = {"name": f"bs{batch_size}", "storage_path": str(folder / "runs"), "model": {"name_or_path": model},
           "data": {"sources": [{"path": str(golden), "schema": "qa"}]}, "tracking": {"enabled": False},
           "eval": {"sources": [{"path": str(golden), "schema": "qa"}], "batch_size": batch_size,
                    "max_new_tokens": max_new_tokens}}
    path = folder / f"bs{batch_size}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    out = subprocess.run([RAYFT, "eval", str(path), "--model", model], capture_output=True, text=True, cwd=folder)
    wall = time.time() - t0
    if out.returncode != 0:
        sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
    m = re.search(r"(\d+) example\(s\) in ([\d.]+)s", out.stdout)
    return wall, float(m.group(2)), int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--baseline-examples", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayft-bench-eval-") as tmp:
        folder = Path(tmp)
        model = str(folder / "tiny")
        subprocess.run([RAYFT, "tiny-model", model], check=True, capture_output=True)
        results = {}
        for bs, n in ((16, args.examples), (1, args.baseline_examples)):
            sub = folder / f"bs{bs}"
            sub.mkdir()
            wall, gen, n = run(sub, model, golden_file(sub, n), bs, args.max_new_tokens)
            results[bs] = n / gen
            print(f"batch {bs:>2}: {n} examples, rayft eval {wall:.1f}s wall, generation + scoring {gen:.1f}s "
                  f"({n / gen:.1f} examples/s)", flush=True)
        print(f"batching speed-up (examples/s): {results[16] / results[1]:.1f}x")

if __name__ == "__main__":
    main()
