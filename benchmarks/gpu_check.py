"""GPU check for one GPU, without Ray: rayft's GPU training and serving paths on a bare machine.

Needs torch (CUDA), transformers, peft and pydantic; DeepSpeed and bitsandbytes may be installed from wheels next to
this script (`--wheels DIR` installs every *.whl there with pip --no-deps first). rayft itself is imported from the
checkout this script sits in (no install needed). Nothing is downloaded: the models are random Llamas built from
`LlamaConfig`.

Parts (each prints passed or FAILED with the error, tokens/s, peak GPU memory and MFU against the GPU's bf16 peak):

    zero2   DeepSpeed ZeRO-2, LoRA (rayft's DeepSpeed and LoRA config builders), bf16, world size 1 on NCCL,
            torch's AdamW (no JIT build of DeepSpeed's fused ops)
    zero3   the same under ZeRO-3
    qlora   bitsandbytes 4-bit (nf4, bf16 compute) base + LoRA: forward and backward
    serve   rayft's hf serving engine on CUDA: one batch of requests over several LoRA adapters at once

MFU counts model FLOPs per trained token as 4N + 6*L*s*h for LoRA (forward 2N, backward through the frozen weights
2N, no weight gradients; attention 2Lsh forward and 4Lsh backward, causal), and 2N per generated token for serving.

    python benchmarks/gpu_check.py                       # about 1B parameters, under 5 minutes on one H100/H200
    python benchmarks/gpu_check.py --device cpu --small  # a smoke test of the script itself (zero2, zero3, serve)
    options: --parts zero2,zero3,qlora,serve --steps N --seq S --batch B --json --peak-tflops T
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
                    "A10": 125.0, "RTX 4090": 165.0}


def import_rayft():
    """`import rayft` from this checkout: its top-level folders are the package (as pyproject maps them)."""
    try:
        import rayft.train.ds_config  # noqa: F401  (installed)
        return
    except ImportError:
        pass
    shim = Path(tempfile.mkdtemp(prefix="rayft-shim-"))
    (shim / "rayft").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(shim))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def random_llama(args, vocab: int):
    from transformers import LlamaConfig

    if args.small:
        return LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096)
    # About 1.1B parameters with a 32k vocabulary: the shape of TinyLlama.
    return LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)


def lora_flops_per_token(n_params: int, cfg, seq: int) -> float:
    return 4 * n_params + 6 * cfg.num_hidden_layers * seq * cfg.hidden_size


def reset_peak(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_training(args, step, n_params: int, cfg) -> dict:
    """Run `step` (one optimizer step, returning its loss) warm-up + timed times; the part's figures."""
    losses, t0 = [], 0.0
    for i in range(args.steps + args.warmup):
        if i == args.warmup:
            sync(args.device)
            t0 = time.perf_counter()
        losses.append(float(step()))
    sync(args.device)
    seconds = time.perf_counter() - t0
    tokens = args.batch * args.seq * args.steps
    return {"tokens_per_s": tokens / seconds, "peak_gib": peak_gib(args.device), "params": n_params,
            "flops": lora_flops_per_token(n_params, cfg, args.seq) * tokens / seconds,
            "note": f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {args.steps} steps of {args.batch}x{args.seq} tokens"}


def deepspeed_part(args, stage: int) -> dict:
    """LoRA steps under DeepSpeed ZeRO-`stage`, configured by rayft's own builders."""
    import deepspeed
    import torch
    from transformers import LlamaForCausalLM

    from rayft.train.config import TrainConfig
    from rayft.train.ds_config import build_deepspeed_config
    from rayft.train.lora import build_lora_config

    on_gpu = args.device.startswith("cuda")
    dtype = "bfloat16" if on_gpu else "float32"
    train = TrainConfig(num_workers=1, use_gpu=on_gpu, micro_batch_size=args.batch, learning_rate=1e-4,
                        max_steps=args.steps, lora={"rank": 16, "alpha": 32, "dropout": 0.0},
                        deepspeed={"zero_stage": stage})
    ds_config = build_deepspeed_config(train, dtype)
    cfg = random_llama(args, 32000)
    reset_peak(args.device)
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - alive while the model is built: built partitioned
        with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=getattr(torch, dtype)):
            model = LlamaForCausalLM(cfg)
    else:
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    from peft import get_peft_model

    model = get_peft_model(model, build_lora_config(train.lora, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"], "llama"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    device = engine.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    def step():
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss

    return timed_training(args, step, n_params, cfg)


def qlora_part(args) -> dict:
    """A 4-bit (nf4) base with LoRA: forward and backward, as rayft's QLoRA path loads it."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    cfg = random_llama(args, 32000)
    folder = tempfile.mkdtemp(prefix="rayft-gpu-qlora-")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    reset_peak(args.device)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.device("meta"):  # the parameter count without memory
        n_params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return timed_training(args, step, n_params, cfg)


def serve_part(args) -> dict:
    """rayft's hf engine on the device: one batch of requests spread over several LoRA adapters (mixed batch)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from rayft.serve.engine import Engine, GenRequest
    from rayft.train.tiny_model import build_tokenizer, default_corpus_files

    work = Path(tempfile.mkdtemp(prefix="rayft-gpu-serve-"))
    tok = build_tokenizer(default_corpus_files())
    cfg = random_llama(args, len(tok))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    base.save_pretrained(work / "base", safe_serialization=True)
    tok.save_pretrained(work / "base")
    adapters = {}
    for k in range(args.adapters):
        torch.manual_seed(k + 1)
        peft = get_peft_model(LlamaForCausalLM.from_pretrained(work / "base"),
                              LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(work / f"ad{k}")
        adapters[f"ad{k}"] = str(work / f"ad{k}")
    reset_peak(args.device)
    eng = Engine(str(work / "base"), adapters=adapters, adapter_cache_size=args.adapters, device=args.device,
                 log=lambda m: None)
    prompt = tok("<|im_start|>user\nHow do I reset my VPN token?<|im_end|>\n<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"]

    def batch():
        return [GenRequest(prompt, args.max_tokens, temperature=0.0, adapter=f"ad{i % args.adapters}")
                for i in range(args.requests)]

    eng.generate_text(batch())  # warm-up: adapter loads, kernels
    sync(args.device)
    t0 = time.perf_counter()
    out = eng.generate_text(batch())
    sync(args.device)
    seconds = time.perf_counter() - t0
    tokens = sum(n for _, n, _ in out)
    return {"tokens_per_s": tokens / seconds, "peak_gib": peak_gib(args.device), "params": n_params,
            "flops": 2 * n_params * tokens / seconds,
            "note": f"{args.requests} requests over {args.adapters} adapters, {tokens} tokens generated"}


PARTS = {"zero2": lambda a: deepspeed_part(a, 2), "zero3": lambda a: deepspeed_part(a, 3), "qlora": qlora_part,
         "serve": serve_part}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="zero2,zero3,qlora,serve")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="a 2-layer model (smoke test)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak, when not in the table")
    ap.add_argument("--wheels", default=None, help="pip install --no-deps every *.whl in this folder first")
    ap.add_argument("--json", action="store_true", help="one JSON object per part")
    args = ap.parse_args(argv)
    if args.small:
        args.seq, args.batch, args.steps, args.requests, args.max_tokens = 64, 2, 2, 8, 8
    if args.wheels:
        wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
        if wheels:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *wheels], check=True)
    # DeepSpeed picks its accelerator once, at import; the process group is one rank on NCCL (gloo on CPU).
    os.environ["DS_ACCELERATOR"] = "cuda" if args.device.startswith("cuda") else "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import_rayft()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --small for a smoke test of the script")
        return 2
    peak = peak_flops(args.device, args.peak_tflops)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; bf16 peak "
          f"{'%.0f TFLOPS' % (peak / 1e12) if peak else 'unknown (MFU not computed)'}", flush=True)
    if any(p in args.parts for p in ("zero2", "zero3")):
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if args.device.startswith("cuda") else "gloo")
    t_all = time.perf_counter()
    failed = 0
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            r = PARTS[name](args)
            row = {"part": name, "passed": True, "tokens_per_s": round(r["tokens_per_s"], 1),
                   "peak_gpu_gib": None if r["peak_gib"] is None else round(r["peak_gib"], 2),
                   "mfu": round(r["flops"] / peak, 4) if peak else None, "params": r["params"], "note": r["note"]}
        except Exception as e:  # noqa: BLE001 - a part that fails is reported, the next one runs
            failed += 1
            row = {"part": name, "passed": False, "error": f"{type(e).__name__}: {e}",
                   "trace": traceback.format_exc(limit=4)[-1500:]}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if args.json:
            print(json.dumps(row), flush=True)
        elif row["passed"]:
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
            mem = f"{row['peak_gpu_gib']} GiB" if row["peak_gpu_gib"] is not None else "-"
            print(f"{name:6s} passed  {row['tokens_per_s']:>10,.0f} tok/s  peak {mem:>10s}  MFU {mfu:>6s}  "
                  f"{row['seconds']}s  ({row['note']})", flush=True)
        else:
            print(f"{name:6s} FAILED  {row['error']}\n{row['trace']}", flush=True)
        import gc

        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - t_all:.0f}s; {failed} part(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
