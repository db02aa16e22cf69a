"""The serving engine in-process (no Ray): mixed-adapter batches, the adapter LRU, int8 quantization.

Two LoRA adapters are trained for a few dozen steps on the tiny model so that their greedy answers differ;
a mixed batch must then give, row by row, exactly what each adapter gives alone.
"""
import pytest

ANSWER_A = "Yes, we are open from nine to five."
ANSWER_B = "No. Please call support."


@pytest.fixture(scope="module")
def adapters(toy_adapters):
    return dict(toy_adapters)  # a, b, c answer ANSWER_A, ANSWER_B, "Maybe later." (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapters):
    from rayft.serve.engine import Engine

    return Engine(tiny_model_dir, adapters=adapters, adapter_cache_size=2)


def _chat_ids(engine, text):
    from rayft.data.chat import render_prompt

    return engine.tokenizer(render_prompt([{"role": "user", "content": text}], engine.tokenizer),
                            add_special_tokens=False)["input_ids"]


def _req(engine, adapter, text="hello", max_tokens=24, **kw):
    from rayft.serve.engine import GenRequest

    kw.setdefault("temperature", 0.0)
    return GenRequest(_chat_ids(engine, text), max_tokens, adapter=adapter, **kw)


def test_adapters_answer_differently(engine):
    a, b, base = (engine.generate_text([_req(engine, x)])[0][0] for x in ("a", "b", None))
    assert a == ANSWER_A
    assert b == ANSWER_B
    assert base not in (a, b)  # the base model is never silently replaced by an adapter


def test_mixed_batch_rows_equal_each_adapter_alone(engine):
    # Different prompts (so different lengths and padding), different adapters, and the base, in one batch.
    rows = [("a", "hello"), ("b", "What are your opening hours?"), (None, "hello"), ("b", "hello"),
            ("a", "What are your opening hours?"), (None, "Tell me something")]
    alone = [engine.generate_text([_req(engine, ad, t)])[0] for ad, t in rows]
    assert len(engine.plan([_req(engine, ad, t) for ad, t in rows])) == 1  # one group: one forward per step
    mixed = engine.generate_text([_req(engine, ad, t) for ad, t in rows])
    assert mixed == alone
    assert [m[0] for m in mixed[:2]] == [ANSWER_A, ANSWER_B]


def test_lru_evicts_least_recently_used_and_reloads(engine):
    cache = engine.cache
    cache.ensure(["a", "b"])
    assert list(cache.loaded) == ["a", "b"]
    before = cache.stats.as_dict()
    out_c = engine.generate_text([_req(engine, "c")])[0][0]  # c is loaded, a (least recent) evicted
    assert list(cache.loaded) == ["b", "c"]
    assert cache.stats.evictions == before["evictions"] + 1 and cache.stats.events[-1] == ("evict", "a")
    assert engine.generate_text([_req(engine, "a")])[0][0] == ANSWER_A  # a comes back, b goes
    assert list(cache.loaded) == ["c", "a"]
    assert cache.stats.misses == before["misses"] + 2 and cache.stats.loads == before["loads"] + 2
    assert cache.stats.load_time_s_total > 0
    assert out_c == "Maybe later."


def test_batch_with_more_adapters_than_the_cache_is_split(engine):
    reqs = [_req(engine, x) for x in ("a", "b", "c", "a")]
    assert len(engine.plan(reqs)) == 2
    assert [t for t, _, _ in engine.generate_text(reqs)] == [ANSWER_A, ANSWER_B, "Maybe later.", ANSWER_A]


def test_grouping_per_adapter_gives_the_same_answers(tiny_model_dir, adapters, engine):
    from rayft.serve.engine import Engine

    grouped = Engine(tiny_model_dir, adapters=adapters, adapter_cache_size=2, mixed_adapter_batches=False)
    reqs = [_req(grouped, x) for x in ("a", "b", None, "a")]
    assert len(grouped.plan(reqs)) == 3
    assert grouped.generate_text(reqs) == engine.generate_text([_req(engine, x) for x in ("a", "b", None, "a")])


def test_sampling_stop_length_and_seed(engine):
    text, n, finish = engine.generate_text([_req(engine, "a", stop=["open"])])[0]
    assert (text, finish) == ("Yes, we are ", "stop")
    text, n, finish = engine.generate_text([_req(engine, "a", max_tokens=3)])[0]
    assert (n, finish) == (3, "length")
    seeded = [_req(engine, None, max_tokens=12, temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
    first, second = engine.generate_text(seeded)
    assert first == second  # the same seed gives the same sample, even within one batch
    other = engine.generate_text([_req(engine, None, max_tokens=12, temperature=1.0, seed=8)])[0]
    assert other[1] == 12
    # a tiny positive temperature samples (no overflow to inf/nan) and tends to the greedy answer
    for t in (1e-30, 5e-324):  # 5e-324 is the smallest float64, 0 in float32
        assert engine.generate_text([_req(engine, "a", temperature=t, seed=3)])[0][0] == ANSWER_A
    # so does a tiny top_p (nucleus of the top token alone), at any temperature
    for p in (1e-300, 5e-324):
        assert engine.generate_text([_req(engine, "a", temperature=2.0, top_p=p, seed=3)])[0][0] == ANSWER_A


def test_int8_quantized_merged_model_checks_agreement(tiny_model_dir, adapters, tmp_path, capsys):
    from rayft.serve.engine import Engine
    from tests.serve_helpers import merge_toy_adapter

    merged = merge_toy_adapter(tiny_model_dir, adapters["a"], str(tmp_path / "merged"))
    q = Engine(merged, quantization="int8", min_agreement=0.5)
    assert "int8 dynamic quantization: greedy answers agree" in capsys.readouterr().out
    assert q.agreement is not None and q.agreement >= 0.5
    assert "DynamicQuantizedLinear" in repr(q.model)
    assert q.generate_text([_req(q, None)])[0][0] == ANSWER_A
    if q.agreement < 1.0:  # a threshold above the measured agreement refuses to start
        with pytest.raises(RuntimeError, match="quantization_min_agreement"):
            Engine(merged, quantization="int8", min_agreement=1.0)


@pytest.mark.parametrize("mode", ["bnb-int8", "bnb-nf4"])
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bitsandbytes_without_cuda_is_refused_naming_the_field_and_the_fix(tiny_model_dir, mode):
    from rayft.serve.engine import Engine

    with pytest.raises(RuntimeError, match=rf"serve\.quantization: '{mode}' loads the model with bitsandbytes on a "
                                           rf"CUDA GPU, and no CUDA GPU is visible .* use serve\.quantization: int8"):
        Engine(tiny_model_dir, quantization=mode)


@pytest.mark.parametrize("mode,layer", [("bnb-int8", "Linear8bitLt"), ("bnb-nf4", "Linear4bit")])
@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="bitsandbytes 8-bit/4-bit loading needs a CUDA GPU; this machine has none")
def test_bitsandbytes_quantized_merged_model_on_gpu_checks_agreement(tiny_model_dir, adapters, tmp_path, capsys, mode,
                                                                     layer):
    from rayft.serve.engine import Engine
    from tests.serve_helpers import merge_toy_adapter

    merged = merge_toy_adapter(tiny_model_dir, adapters["a"], str(tmp_path / "merged"))
    q = Engine(merged, quantization=mode, min_agreement=0.0)
    assert "greedy answers agree with full precision" in capsys.readouterr().out
    assert layer in repr(q.model) and q.device.type == "cuda"
    assert q.agreement is not None
    text = q.generate_text([_req(q, None)])[0][0]
    assert text == ANSWER_A or q.agreement < 1.0  # the trained answer survives unless the check saw drift
    if q.agreement < 1.0:
        with pytest.raises(RuntimeError, match="quantization_min_agreement"):
            Engine(merged, quantization=mode, min_agreement=1.0)


def test_a_cancelled_row_leaves_the_batch(engine):
    import threading

    stop = threading.Event()
    reqs = [_req(engine, None, max_tokens=40, stop=["zzzz"], cancel=stop), _req(engine, None, max_tokens=40, stop=["zzzz"])]
    steps = 0
    rows_per_step = []
    for outs in engine.generate(reqs):
        steps += 1
        rows_per_step.append(sum(o is not None for o in outs))
        if steps == 3:
            stop.set()  # the client of row 0 went away
    assert rows_per_step[:3] == [2, 2, 2] and set(rows_per_step[3:]) == {1}
    assert steps == 40


def test_incremental_detokenization_streams_exactly_the_full_decode(engine):
    """Each step decodes only the newest tokens; the pieces a row streams (multi-byte characters held back until
    complete) add up to the decode of all its tokens, for text with accents, emoji and CJK and for random ids."""
    import random

    from rayft.serve.engine import GenRequest, _Row

    tok = engine.tokenizer
    samples = [tok("Grüße aus Köln 🎉 — 東京 ok", add_special_tokens=False)["input_ids"]]
    rng = random.Random(0)
    samples += [[rng.randrange(len(tok)) for _ in range(60)] for _ in range(20)]
    eos = tok.eos_token_id
    for ids in samples:
        ids = [i for i in ids if i != eos]
        row = _Row(GenRequest(_chat_ids(engine, "hello"), len(ids)), tok, {eos}, 0)
        streamed = "".join(row.add(i).text for i in ids)
        assert streamed == tok.decode(ids, skip_special_tokens=True), ids


def test_a_gpu_replica_without_cuda_is_refused_naming_the_field(tiny_model_dir):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for replicas that reserved a GPU torch cannot see")
    from rayft.serve.engine import Engine

    with pytest.raises(RuntimeError, match="num_gpus_per_replica asks for a GPU but torch sees no CUDA device"):
        Engine(tiny_model_dir, device="cuda")


def test_on_a_gpu_weights_and_lora_slots_are_on_the_device_in_half_precision(tiny_model_dir, adapters):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (this machine has none)")
    from rayft.serve.engine import Engine, gpu_dtype

    eng = Engine(tiny_model_dir, adapters=adapters, adapter_cache_size=2, device="cuda")
    want = getattr(torch, gpu_dtype())
    assert {(p.device.type, p.dtype) for p in eng.model.parameters()} == {("cuda", want)}
    out = eng.generate_text([_req(eng, "a"), _req(eng, "b"), _req(eng, None)])
    assert [o[0] for o in out[:2]] == [ANSWER_A, ANSWER_B]
    assert {(b.device.type, b.dtype) for n, b in eng.model.named_buffers() if n.endswith((".A", ".B"))} == \
        {("cuda", want)}
