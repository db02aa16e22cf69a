"""The batched multi-LoRA path (serve/batched_lora.py) against PEFT itself, and what it refuses.

Adapters here are not trained: PEFT initialises lora_B with random values (init_lora_weights=False), so each
adapter changes the logits a lot and any mistake in the slot arithmetic (scaling, rank padding, transposes, a
wrong slot for a row) shows up far above the fp32 tolerance.
"""
import pytest
import torch

TOL = 1e-5


def _make_adapter(base_dir, out_dir, seed, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True)
    lora.setdefault("target_modules", ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("batched-lora")
    return {
        "r4": _make_adapter(tiny_model_dir, str(root / "r4"), 1, r=4, lora_alpha=8),
        # a larger rank (the others are zero-padded to it) and rank-stabilised scaling alpha / sqrt(r)
        "r8-rslora": _make_adapter(tiny_model_dir, str(root / "r8"), 2, r=8, lora_alpha=4, use_rslora=True),
        # other modules (k_proj, gate_proj) and only the second decoder layer
        "r2-kgate-l1": _make_adapter(tiny_model_dir, str(root / "r2"), 3, r=2, lora_alpha=2,
                                     target_modules=["k_proj", "gate_proj"], layers_to_transform=[1]),
    }


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0]).eval()
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    return model


def _batch(tokenizer, texts):
    """Left-padded ids, mask and positions, as the engine builds them."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        attn[i, L - len(r):] = 1
    return dict(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0))


def _compare(engine, peft_model, plan):
    texts = ["hello", "What are your opening hours?", "The quick brown fox jumps", "Why?", "Tell me a story, please"]
    inputs = _batch(engine.tokenizer, [texts[i % len(texts)] for i in range(len(plan))])
    engine.cache.ensure([a for a in plan if a])
    slots = torch.tensor([engine.cache.slot(a) for a in plan])
    with torch.no_grad():
        ours = engine._forward(slots, **inputs).logits
        ref = peft_model(**inputs, adapter_names=[a or "__base__" for a in plan]).logits
    mask = inputs["attention_mask"].bool()  # padded positions are not compared (nothing reads them)
    return (ours[mask] - ref[mask]).abs().max().item(), ref[mask].abs().max().item()


def test_mixed_batch_logits_equal_peft(tiny_model_dir, adapters, peft_model):
    from rayft.serve.engine import Engine

    engine = Engine(tiny_model_dir, adapters=adapters, adapter_cache_size=3)
    plan = ["r4", None, "r8-rslora", "r2-kgate-l1", "r8-rslora", "r4", None]
    err, scale = _compare(engine, peft_model, plan)
    assert err < TOL, (err, scale)
    with torch.no_grad():  # the adapters really change the answer: PEFT without them differs by far more
        with peft_model.disable_adapter():
            inputs = _batch(engine.tokenizer, ["hello"])
            bare = peft_model(**inputs).logits
        lora = peft_model(**inputs, adapter_names=["r4"]).logits
    assert (bare - lora).abs().max().item() > 1000 * TOL


def test_logits_stay_equal_after_eviction_and_reload_into_other_slots(tiny_model_dir, adapters, peft_model):
    from rayft.serve.engine import Engine

    engine = Engine(tiny_model_dir, adapters=adapters, adapter_cache_size=1)  # slots 1 and 2 take turns
    assert _compare(engine, peft_model, ["r8-rslora", None, "r8-rslora"])[0] < TOL
    first = engine.cache.loaded["r8-rslora"]
    assert _compare(engine, peft_model, ["r4", None])[0] < TOL  # r8-rslora is evicted
    assert _compare(engine, peft_model, [None, "r2-kgate-l1", "r2-kgate-l1"])[0] < TOL  # r4 is evicted
    assert engine.cache.loaded["r2-kgate-l1"] == first  # a smaller adapter in the slot r8-rslora had: no leftovers
    assert _compare(engine, peft_model, ["r8-rslora", None])[0] < TOL
    assert engine.cache.loaded["r8-rslora"] != first and engine.cache.stats.evictions == 3
    # evicted adapters leave zeros behind: a row pointed at the freed slot gets the bare base model's logits
    assert first in engine.cache.free
    with torch.no_grad():
        inputs = _batch(engine.tokenizer, ["hello", "hello"])
        with peft_model.disable_adapter():
            bare = peft_model(**inputs).logits
        ours = engine._forward(torch.tensor([first, engine.cache.loaded["r8-rslora"]]), **inputs).logits
    assert (ours[0] - bare[0]).abs().max().item() < TOL
    assert (ours[1] - bare[1]).abs().max().item() > 1000 * TOL


@pytest.mark.parametrize("kind,words", [
    ("dora", "DoRA (use_dora: true)"),
    ("modules_to_save", "modules_to_save"),
    ("lm_head", "LoRA on 'lm_head' (only linear layers of the decoder"),
    ("embedding", "LoRA on embeddings"),
    ("bias", "trained biases (bias != 'none')"),
    ("rank_pattern", "per-module ranks (rank_pattern)"),
])
def test_unsupported_adapters_are_refused_naming_the_adapter_and_feature(tiny_model_dir, adapters, tmp_path, kind,
                                                                          words):
    from rayft.serve.adapters import AdapterLoadError
    from rayft.serve.engine import Engine, GenRequest

    lora = {"dora": dict(r=4, lora_alpha=8, use_dora=True),
            "modules_to_save": dict(r=4, lora_alpha=8, modules_to_save=["lm_head"]),
            "lm_head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
            "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]),
            "bias": dict(r=4, lora_alpha=8, bias="lora_only"),
            "rank_pattern": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 8})}[kind]
    path = _make_adapter(tiny_model_dir, str(tmp_path / kind), 4, **lora)
    engine = Engine(tiny_model_dir, adapters={"odd": path, "r4": adapters["r4"]}, adapter_cache_size=2)
    ids = engine.tokenizer("hello", add_special_tokens=False)["input_ids"]
    with pytest.raises(AdapterLoadError, match=r"adapter 'odd' .* could not be loaded") as e:
        engine.generate_text([GenRequest(ids, 4, temperature=0.0, adapter="odd")])
    assert words in str(e.value) and "rayft export" in str(e.value)
    assert "odd" not in engine.cache.loaded and engine.cache.stats.evictions == 0
    text, n, _ = engine.generate_text([GenRequest(ids, 4, temperature=0.0, adapter="r4")])[0]
    assert n >= 1  # the engine still serves other adapters
