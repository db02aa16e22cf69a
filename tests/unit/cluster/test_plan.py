"""`rayft plan`: parameter counts, model-state memory against DeepSpeed's own estimators, activations,
and the worker-type recommendation. No downloads: model shapes come from hand-written config.json
folders (Qwen2.5-1.5B and Llama-2-7B dimensions) and the tiny model; models are built on `meta`.

Comparing like with like. DeepSpeed's estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`) are for full fine-tuning: every parameter they are given has
16-bit weights, gradients, fp32 master weights and Adam moments. Under LoRA only the adapter trains, so:
- the LoRA states are compared with DeepSpeed's estimate for the *trainable* parameter count, with the
  config's offload_optimizer (and offload_params under ZeRO-3);
- the frozen base weights hold only their 16-bit copy. DeepSpeed's figure for exactly that is its
  estimate with the optimizer offloaded (GPU keeps the 16-bit parameters: 2 P under ZeRO-2,
  2 P / N + the largest-layer buffer under ZeRO-3, only the buffer with offload_params), so the frozen
  part is compared with that estimate for the *frozen* parameter count.
Both estimates add a gather buffer for the largest layer under ZeRO-3; it exists once on a GPU, so the
LoRA estimate's buffer (4 x the largest adapter matrix, under 1 MB) is taken out before comparing.
Only GPU figures are compared: DeepSpeed's CPU figures include a 1.5x buffer factor and node-level sums.
"""
import json
from pathlib import Path

import pytest

from rayft.cluster.config import load_config
from rayft.cluster.plan import PlanError, estimate_memory, make_plan, plan_json, read_model_shape

ROOT = Path(__file__).resolve().parents[3]
GPU_EXAMPLE = ROOT / "examples" / "qwen2.5-1.5b-gpu.yaml"

QWEN2_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
    "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
}
LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}


def _folder(tmp_path_factory, name, cfg):
    d = tmp_path_factory.mktemp(name)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _folder(tmp_path_factory, "qwen2-1.5b", QWEN2_1_5B)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _folder(tmp_path_factory, "llama-7b", LLAMA_7B)


def _cfg(model_dir, *sets):
    return load_config(GPU_EXAMPLE, [f"model.name_or_path={model_dir}", *sets])


@pytest.fixture(scope="module")
def shapes(qwen_dir, llama_dir):
    out = {}
    for key, d in (("qwen2-1.5b", qwen_dir), ("llama-7b", llama_dir)):
        cfg = _cfg(d)
        out[key] = (d, read_model_shape(cfg.model, cfg.train.lora))
    return out


def test_parameter_counts_match_the_published_models(shapes):
    _, q = shapes["qwen2-1.5b"]
    _, llama = shapes["llama-7b"]
    assert q.total_params == 1_543_714_304          # Qwen2.5-1.5B (tied embeddings counted once)
    assert llama.total_params == 6_738_415_616          # Llama-2-7B
    # LoRA rank 16 on q,k,v,o,gate,up,down: r x (in + out) per adapted layer
    assert q.trainable_params == 28 * 16 * ((1536 + 1536) * 2 + (1536 + 256) * 2 + (1536 + 8960) * 3)
    assert q.frozen_params == q.total_params
    assert q.largest_layer_params == 151936 * 1536  # the embedding
    assert llama.kv_width == 4096 and q.kv_width == 256


def test_tiny_model_counts_match_the_real_peft_model(tiny_model_dir):
    """The meta-device count equals the count on the real, loaded model with its adapter."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rayft.models.architectures import resolve_target_modules
    from rayft.train.lora import build_lora_config

    cfg = load_config(ROOT / "examples" / "quickstart.yaml", [f"model.name_or_path={tiny_model_dir}"])
    shape = read_model_shape(cfg.model, cfg.train.lora)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total = sum(p.numel() for p in base.parameters())
    pm = get_peft_model(base, build_lora_config(cfg.train.lora, resolve_target_modules("auto", base), "llama"))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert (shape.total_params, shape.trainable_params) == (total, trainable)


SETTINGS = [  # zero stage, offload_optimizer, offload_params
    (2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)]


@pytest.mark.parametrize("model", ["qwen2-1.5b", "llama-7b"])
@pytest.mark.parametrize("num_gpus", [1, 4, 8])
@pytest.mark.parametrize("zero,off_opt,off_par", SETTINGS)
def test_model_states_match_deepspeeds_estimators(shapes, model, num_gpus, zero, off_opt, off_par):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    d, shape = shapes[model]
    cfg = _cfg(d, "model.dtype=bfloat16", f"train.num_workers={num_gpus}", "train.global_batch_size=null",
               f"train.deepspeed.zero_stage={zero}", f"train.deepspeed.offload_optimizer={off_opt}",
               f"train.deepspeed.offload_params={off_par}")
    plan = estimate_memory(cfg, shape)
    trainable, frozen = shape.trainable_params, shape.frozen_params
    if zero == 2:
        _, ds_lora = estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=num_gpus, cpu_offload=off_opt)
        _, ds_frozen = estimate_zero2_model_states_mem_needs(frozen, num_gpus_per_node=num_gpus, cpu_offload=True)
        ours_frozen = plan.frozen_weights
    else:
        _, ds_lora, lora_buffer = estimate_zero3_model_states_mem_needs(
            trainable, shape.largest_trainable_layer_params, num_gpus_per_node=num_gpus,
            cpu_offload=off_opt, cpu_offload_params=off_par)
        ds_lora -= lora_buffer
        _, ds_frozen, _ = estimate_zero3_model_states_mem_needs(
            frozen, shape.largest_layer_params, num_gpus_per_node=num_gpus,
            cpu_offload=True, cpu_offload_params=off_par)
        ours_frozen = plan.frozen_weights + plan.gather_buffer
    assert plan.lora_states == pytest.approx(ds_lora, rel=0.10, abs=1024)
    assert ours_frozen == pytest.approx(ds_frozen, rel=0.10)
    assert plan.model_states == pytest.approx(ds_lora + ds_frozen, rel=0.10)


def test_activations_order_checkpointing_dropout_and_eager_attention(shapes):
    """Directions only: the plan's activation figures are checked against measured peaks in test_plan_measured.py."""
    d, shape = shapes["llama-7b"]
    base = ("model.dtype=bfloat16", "data.max_seq_length=1024", "train.micro_batch_size=2",
            "train.gradient_checkpointing=false")
    plan = estimate_memory(_cfg(d, *base, "train.lora.dropout=0"), shape)
    assert plan.activations == plan.activations_full
    assert plan.activations_checkpointed < plan.activations_full / 5
    assert estimate_memory(_cfg(d, *base, "train.lora.dropout=0.1"), shape).activations > plan.activations
    assert estimate_memory(_cfg(d, *base, "train.lora.dropout=0", "model.attn_implementation=eager"),
                           shape).activations > plan.activations


def test_tokens_per_step_and_dtype(shapes):
    d, shape = shapes["qwen2-1.5b"]
    cfg = _cfg(d)  # 4 workers x 4 rows x 2048 tokens, global batch 64 -> 4 accumulation steps
    plan = estimate_memory(cfg, shape)
    assert plan.tokens_per_step == 64 * 2048
    assert plan.dtype == "bfloat16"
    fp32 = estimate_memory(_cfg(d, "model.dtype=float32"), shape)
    assert fp32.frozen_weights == 2 * plan.frozen_weights
    q4 = estimate_memory(_cfg(d, "model.quantization=4bit", "train.deepspeed.zero_stage=2"), shape)
    assert q4.frozen_weights < 0.45 * estimate_memory(_cfg(d, "train.deepspeed.zero_stage=2"), shape).frozen_weights


def test_recommends_the_4_gpu_node_for_the_shipped_example(qwen_dir, tmp_path):
    # The shipped cluster's autoscaler starts spot first (cluster/autoscaler_policy.py): the spot twin, then on-demand.
    result = make_plan(_cfg(qwen_dir), ROOT / "cluster.yaml")
    rec = plan_json(result)["recommended"]
    assert rec == {"worker_type": "gpu-4x-a10g-spot", "nodes": 1, "fallback": "gpu-4x-a10g"}
    assert "recommended: gpu-4x-a10g-spot (g5.12xlarge) x 1 node(s)" in result["text"]
    assert "spot, with gpu-4x-a10g (on-demand) when spot capacity is short" in result["text"]
    # Without the spot-first scorer Ray's autoscaler starts the on-demand type, and the plan says so.
    text = (ROOT / "cluster.yaml").read_text()
    scorer = "RAY_AUTOSCALER_UTILIZATION_SCORER=rayft.cluster.autoscaler_policy.spot_first_scorer"
    assert scorer in text
    (tmp_path / "cluster.yaml").write_text(text.replace(scorer, ""))
    plain = plan_json(make_plan(_cfg(qwen_dir), tmp_path / "cluster.yaml"))["recommended"]
    assert plain == {"worker_type": "gpu-4x-a10g", "nodes": 1, "fallback": None}
    assert "activations (checkpointed)" in result["text"] and "tokens per step: 131,072" in result["text"]


def test_suggests_settings_when_nothing_fits(llama_dir):
    cfg = _cfg(llama_dir, "train.gradient_checkpointing=false", "train.deepspeed.zero_stage=2",
               "data.max_seq_length=4096", "train.micro_batch_size=8", "train.global_batch_size=null")
    result = make_plan(cfg, ROOT / "cluster.yaml")
    assert plan_json(result)["recommended"] is None
    assert result["hints"] and any("gradient_checkpointing" in h or "micro_batch_size" in h for h in result["hints"])
    assert "no worker type fits" in result["text"]


def test_unreadable_model_config_names_the_field(tmp_path):
    cfg = _cfg(str(tmp_path))  # a folder without config.json: no download is attempted
    with pytest.raises(PlanError, match=r"model\.name_or_path: cannot read the model config"):
        read_model_shape(cfg.model, cfg.train.lora)



def test_rayft_plan_command(qwen_dir, tmp_path, capsys):
    from rayft.cluster.cli import main

    assert main(["plan", str(GPU_EXAMPLE), "--set", f"model.name_or_path={qwen_dir}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"] == {"worker_type": "gpu-4x-a10g-spot", "nodes": 1, "fallback": "gpu-4x-a10g"}
    assert out["memory_per_gpu_bytes"]["tokens_per_step"] == 131072
    assert out["model"]["trainable_params"] == 18_464_768

    assert main(["plan", str(GPU_EXAMPLE), "--set", f"model.name_or_path={qwen_dir}",
                 "--cluster", str(tmp_path / "none.yaml")]) == 2
    assert "no such cluster config" in capsys.readouterr().err
    assert main(["plan", str(GPU_EXAMPLE), "--set", f"model.name_or_path={tmp_path}"]) == 2
    assert "model.name_or_path: cannot read the model config" in capsys.readouterr().err


def test_plan_says_fp16_with_loss_scaling_on_gpus_without_bf16(qwen_dir, tmp_path):
    # The shipped cluster.yaml with its 1-GPU A10G type turned into a T4 type (no bf16: training runs in fp16).
    text = (ROOT / "cluster.yaml").read_text().replace("InstanceType: g5.2xlarge", "InstanceType: g4dn.2xlarge", 1)
    (tmp_path / "cluster.yaml").write_text(text)
    result = make_plan(_cfg(qwen_dir, "model.dtype=auto"), tmp_path / "cluster.yaml")
    by_gpu = {o.gpu: o.dtype for o in result["options"]}
    assert by_gpu["T4"] == "float16" and by_gpu["A10G"] == "bfloat16" and by_gpu["A100"] == "bfloat16"
    assert "float16 with dynamic loss scaling (no bf16 on this GPU)" in result["text"]
    assert "training in bfloat16" in result["text"]
    assert all(o["dtype"] in ("bfloat16", "float16") for o in plan_json(result)["options"])
    # The shipped example pins bfloat16: on the T4 the plan says to change that.
    pinned = make_plan(_cfg(qwen_dir), tmp_path / "cluster.yaml")
    assert "model.dtype is bfloat16, which this GPU lacks: set model.dtype: auto" in pinned["text"]


def test_cpu_training_recommends_a_cpu_worker_type(qwen_dir, tmp_path):
    # Ray's autoscaler starts GPU nodes only for work that asks for GPUs; CPU training gets the CPU type.
    cfg = _cfg(qwen_dir, "train.use_gpu=false", "train.num_workers=2", "train.cpus_per_worker=4",
               "train.global_batch_size=null")
    result = make_plan(cfg, ROOT / "cluster.yaml")
    assert plan_json(result)["recommended"] == {"worker_type": "cpu-16", "nodes": 1, "fallback": None}
    assert [o.worker_type for o in result["options"]] == ["cpu-16"]
    assert "recommended: cpu-16 (m6i.4xlarge) x 1 node(s) for 2 worker(s)" in result["text"]
    more = make_plan(_cfg(qwen_dir, "train.use_gpu=false", "train.num_workers=8", "train.cpus_per_worker=4",
                          "train.global_batch_size=null"), ROOT / "cluster.yaml")
    assert plan_json(more)["recommended"] == {"worker_type": "cpu-16", "nodes": 2, "fallback": None}
    # more workers than max_workers nodes of the type hold: none fits, and the plan says what to change
    none = make_plan(_cfg(qwen_dir, "train.use_gpu=false", "train.num_workers=32", "train.cpus_per_worker=4",
                          "train.global_batch_size=null"), ROOT / "cluster.yaml")
    assert plan_json(none)["recommended"] is None
    assert "no CPU worker type holds these workers" in none["text"]
