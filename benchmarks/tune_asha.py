"""Tune benchmark: the same search with ASHA and without it (every trial to max steps), in one run.

Prints, for each: trial-steps run, wall time, the best trial's learning rate and eval loss; then the
compute ASHA saved (1 - steps with ASHA / steps without) and whether both pick the same winner.
Both searches run through `rayft tune` (the CLI, in a subprocess), on the tiny model and the sample data.

    .venv/bin/python benchmarks/tune_asha.py [--trials 6] [--max-steps 12]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RAYFT = str(Path(sys.executable).with_name("rayft"))


def write_config(folder: Path, model_dir: str, asha: bool, lrs: list[float], max_steps: int) -> Path:
    cfg = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    cfg["model"]["name_or_path"] = model_dir
    cfg["storage_path"] = str(folder)
    cfg["name"] = "asha" if asha else "full"
    cfg["data"]["max_seq_length"] = 256
    cfg["train"].update({"num_workers": 1, "max_steps": max_steps, "eval_every_n_steps": 2, "save_every_n_steps": 2,
                         "logging_every_n_steps": 2, "warmup_steps": 0, "lr_schedule": "constant", "micro_batch_size": 4})
    cfg["tracking"]["register_model"] = cfg["name"]
    cfg["tune"] = {"num_samples": 1, "search_space": {"train.learning_rate": {"grid": lrs}},
                   "asha": {"enabled": asha, "grace_period_steps": 2, "reduction_factor": 2}}
    path = folder / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([RAYFT, "tune", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    secs = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"rayft tune failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    m = re.search(r"compute: (\d+) trial-steps run of (\d+)", out.stdout)
    best = re.search(r"best: trial (\S+) \(eval loss ([0-9.]+)\)", out.stdout)
    row = next(line.split() for line in out.stdout.splitlines() if best and line.startswith(best.group(1)))
    return {"seconds": secs, "steps": int(m.group(1)), "full": int(m.group(2)), "best_lr": float(row[1]),
            "best_loss": float(best.group(2)), "table": out.stdout[out.stdout.find("trial "):m.start()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=6, help="learning rates in the grid (some deliberately bad)")
    ap.add_argument("--max-steps", type=int, default=12)
    args = ap.parse_args()
    lrs = [2e-2, 1e-2, 5e-3, 2.0, 1e-7, 5e-1, 1e-6, 3e-3][: args.trials]
    from rayft.train.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(os.path.join(tmp, "tiny"))
        results = {}
        for asha in (True, False):
            folder = Path(tmp) / ("asha" if asha else "full")
            folder.mkdir()
            results["asha" if asha else "no_asha"] = run(write_config(folder, model_dir, asha, lrs, args.max_steps))
    a, f = results["asha"], results["no_asha"]
    print(f"{len(lrs)} trials, learning rates {lrs}, up to {args.max_steps} steps each\n")
    print(f"{'search':<10} {'trial-steps':>12} {'wall s':>8} {'best lr':>10} {'best eval loss':>15}")
    for name, r in results.items():
        print(f"{name:<10} {r['steps']:>12} {r['seconds']:>8.0f} {r['best_lr']:>10.3g} {r['best_loss']:>15.4f}")
    saved = 1 - a["steps"] / f["steps"]
    print(f"\ncompute saved by ASHA: {100 * saved:.0f}% of trial-steps ({a['steps']} vs {f['steps']}); "
          f"wall time ratio {a['seconds'] / f['seconds']:.2f}")
    print(f"same winner: {'yes' if a['best_lr'] == f['best_lr'] else 'no'} "
          f"(ASHA lr {a['best_lr']:.3g}, full lr {f['best_lr']:.3g})")
    print("\nASHA trials:\n" + a["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
