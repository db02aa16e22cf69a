"""Memory per worker, planned against measured: ZeRO-0, ZeRO-2 and ZeRO-3 (optimizer offload off and on), CPU.

    .venv/bin/python benchmarks/memory_plan.py [--json] [--layers 20 --hidden 2048 --intermediate 5632]
                                               [--configs z0,z2,z2-offload,z3,z3-offload] [--workdir DIR]

A random Llama-shaped model (LlamaConfig only, about 1B parameters at the defaults, a 1k-token vocabulary so that
the unsharded logits stay out of the way) is written once as sharded safetensors; then rayft's own training path
(`fit`: Ray Train, 2 workers, DeepSpeed, LoRA, a checkpoint at the end) trains it 2 steps per configuration.

Measured, per worker: the peak resident memory above that worker's own baseline, taken with the libraries imported
and before the model loads (the training loop reports it as `peak_rss_over_baseline_mb`, max and min over the
workers). A Ray/torch worker idles near 1 GB, which says nothing about ZeRO. Planned: `rayft plan --device cpu`'s
figure for the same quantity (cluster/plan.py `estimate_memory(device="cpu")`).

Goals (issue 13): ZeRO-3's peak at most 0.6x ZeRO-0's; the plan within 25% of the measured peak per configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

CONFIGS = {
    "z0": (0, False),
    "z2": (2, False),
    "z2-offload": (2, True),
    "z3": (3, False),
    "z3-offload": (3, True),
}
MiB = 2 ** 20


def build_model(out: Path, layers: int, hidden: int, intermediate: int, heads: int) -> str:
    """A random Llama of the given shape and the sample-data tokenizer, as safetensors shards of 1 GB at most."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayft.train.tiny_model import build_tokenizer, default_corpus_files

    if (out / "config.json").is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(default_corpus_files(), vocab_size=1024)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Random weights, small enough that 2 steps stay finite; made one tensor at a time, not by the module inits.
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="1GB")
    tok.save_pretrained(str(out))
    del model
    return str(out)


def config_for(model_dir: str, runs: Path, name: str, zero: int, offload: bool, seq: int):
    from rayft.cluster.config import load_config

    return load_config(ROOT / "examples" / "quickstart.yaml", [
        f"name={name}", f"model.name_or_path={model_dir}", f"storage_path={runs}",
        "data.sources=[{name: support_qa, path: examples/data/support_qa.json, schema: qa}]",
        f"data.max_seq_length={seq}", "data.eval_fraction=0.0", "tracking.enabled=false",
        "train.num_workers=2", "train.cpus_per_worker=1", "train.micro_batch_size=1",
        "train.gradient_accumulation_steps=1", "train.max_steps=2", "train.save_every_n_steps=2",
        "train.warmup_steps=0", "train.max_failures=0",
        f"train.deepspeed.zero_stage={zero}", f"train.deepspeed.offload_optimizer={str(offload).lower()}",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128, help="data.max_seq_length (packed rows are full)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    ap.add_argument("--workdir", default=None, help="keeps the model between runs (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="one JSON object per configuration")
    args = ap.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")

    from rayft.cluster.plan import estimate_memory, read_model_shape
    from rayft.cluster.ray_conn import connect
    from rayft.train.trainer import fit, prepare_training_data

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rayft-memplan-"))
    t0 = time.time()
    model_dir = build_model(workdir / f"llama-{args.layers}x{args.hidden}", args.layers, args.hidden,
                            args.intermediate, args.heads)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    say(f"model {model_dir} ready in {time.time() - t0:.0f} s")
    connect(num_cpus=2)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=workdir))  # fresh: a run name with checkpoints would resume
    first = config_for(model_dir, runs, "memplan-data", 0, False, args.seq)
    shape = read_model_shape(first.model, first.train.lora)
    say(f"{shape.total_params / 1e9:.2f}B parameters, {shape.trainable_params:,} trainable; "
        f"{args.seq} tokens per row, 1 row per worker per step, 2 workers")
    data = prepare_training_data(first, log=lambda _: None)
    rows = []
    for name in names:
        zero, offload = CONFIGS[name]
        cfg = config_for(model_dir, runs, f"memplan-{name}", zero, offload, args.seq)
        planned = estimate_memory(cfg, shape, device="cpu").total
        t = time.time()
        out = fit(cfg, data, log=lambda _: None, register=False)
        m = out.metrics
        row = {"config": name, "zero_stage": zero, "offload": offload, "planned_bytes": int(planned),
               "measured_peak_bytes": int(m["peak_rss_over_baseline_mb"] * MiB),
               "measured_peak_min_bytes": int(m["peak_rss_over_baseline_mb_min"] * MiB),
               "loss": m.get("loss"), "seconds": round(time.time() - t, 1)}
        row["plan_error"] = round(row["planned_bytes"] / max(row["measured_peak_bytes"], 1) - 1, 3)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            say(f"{name:11s} planned {planned / MiB:8.0f} MiB  measured {row['measured_peak_bytes'] / MiB:8.0f} MiB "
                f"(other worker {row['measured_peak_min_bytes'] / MiB:6.0f})  plan/measured "
                f"{1 + row['plan_error']:.2f}  loss {row['loss']:.3f}  {row['seconds']:.0f} s")
    by = {r["config"]: r for r in rows}
    if "z0" in by and "z3" in by:
        say(f"ZeRO-3 / ZeRO-0 measured peak: {by['z3']['measured_peak_bytes'] / by['z0']['measured_peak_bytes']:.2f} "
            "(goal <= 0.6)")
    say(f"plan within 25%: {sum(abs(r['plan_error']) <= 0.25 for r in rows)} of {len(rows)} configurations; "
        f"{time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
