"""The OpenAI-compatible Ray Serve application.

    GET  /health                 liveness (no key needed)
    GET  /v1/models              the model, its adapters (with their parent) and A/B names
    POST /v1/completions         prompt -> text            (`stream: true`: server-sent events)
    POST /v1/chat/completions    messages -> reply, rendered with the tokenizer's chat template
    GET  /v1/stats               this replica's counters: adapter cache, in-flight requests, quantization check

Requests that reach a replica are batched by `@serve.batch`: one batch is decoded together, rows for
different adapters in the same forward pass. Each request gets an asyncio queue; the batch pushes every new
piece of text into it, so streaming and plain answers share one code path. A batch that raises answers its
own requests with a 500 and the replica carries on.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from .config import ServeConfig, ServeStartError
from .gate import DEFAULT_VERSION, VERSION_HEADER, Gate, load_keys, served_name
from .schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    NamedToolChoice,
    openai_app,
    openapi_request_body,
    parse_request,
)
from .tools import ToolCallStream, answer_message, call_deltas, finish_reason

log = logging.getLogger("rayft.serve")

api = openai_app()


def _generation_error(exc: Exception, rid: str, adapter: Optional[str]) -> APIError:
    """What a client learns of a failed generation: which of its choices failed (the adapter it asked for) and a
    request id; the exception itself (its paths and internals) goes to the replica's log under that id."""
    log.error("request %s: generation failed", rid, exc_info=exc)
    from .adapters import AdapterLoadError

    what = (f"adapter {adapter!r} could not be loaded on this server" if isinstance(exc, AdapterLoadError) and adapter
            else "generation failed")
    return APIError(500, f"{what} (request id {rid}); the server's log has the details under that id",
                    code="generation_failed")


# Module functions the deployment's methods call are defined above it: Serve serializes the class when it is decorated.
def render_chat(req: ChatRequest, tok, tool_calling: bool = True) -> str:
    """The prompt for a chat request: the tokenizer's chat template over the messages (with their tool calls and tool
    results) and, unless tool_choice is "none", the tools (`apply_chat_template(..., tools=...)`). `tool_calling`
    false (serve.tool_call_parser: null) refuses requests that would need the output read for calls."""
    if not getattr(tok, "chat_template", None):
        raise APIError(400, f"messages: model {req.model!r} has no chat template, so a chat cannot be rendered "
                       "for it; send a prompt to /v1/completions instead, or serve a tokenizer with a chat "
                       "template (rayft exports carry the one they were trained with)", param="messages")
    if req.tools_active:
        if not tool_calling:
            raise APIError(400, "tools: tool calling is off on this server (serve.tool_call_parser: null); send "
                           "tool_choice 'none' to show the model the conversation without tools, or leave tools out",
                           param="tools")
        choice = req.tool_choice
        if choice == "required" or isinstance(choice, NamedToolChoice):
            what = "'required'" if choice == "required" else f"a named function ({choice.function.name!r})"
            raise APIError(400, f"tool_choice: {what} forces a call, which needs guided decoding; the hf engine does "
                           f"not have it. Send tool_choice 'auto' (the model decides whether to call), or serve on the "
                           f"vllm engine (serve.engine: vllm), which hands it to vLLM's guided decoding", param="tool_choice",
                           code="unsupported_value")
        if "tools" not in tok.chat_template:
            raise APIError(400, f"tools: the chat template of model {req.model!r} does not render tools, so the model "
                           f"would never see them; serve a tokenizer whose template takes `tools` (rayft's default "
                           f"template does), or leave tools out", param="tools")
    messages = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            # Templates read the arguments as an object (transformers' convention); the request carries JSON text.
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                                 for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools_active else None
    try:
        return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template that cannot render these messages
        raise APIError(400, f"messages: the chat template cannot render them ({e})", param="messages") from None


@dataclass
class _Job:
    version: str
    req: Any  # engine.GenRequest
    queue: asyncio.Queue
    created: float = field(default_factory=time.perf_counter)
    started: bool = False


_END = object()


class _Metrics:
    """rayft's serving metrics (exported with Ray Serve's own on the metrics port)."""

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.batches = 0
        self.max_batch = 0
        self.rows = 0
        self._tokens = Counter("rayft_serve_tokens_generated", "Completion tokens generated.", tag_keys=("version", "adapter"))
        self._ttft = Histogram("rayft_serve_time_to_first_token_s", "Time from request to its first token.",
                               boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], tag_keys=("version",))
        self._batch = Histogram("rayft_serve_batch_size", "Requests per decoded batch.",
                                boundaries=[1, 2, 4, 8, 16, 32, 64])
        self._cache = Counter("rayft_serve_adapter_cache_events", "Adapter cache hits, misses, loads, evictions.",
                              tag_keys=("event",))
        self._load = Histogram("rayft_serve_adapter_load_s", "Time to load an adapter.",
                               boundaries=[0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30])

    def tokens(self, n: int, version: str, adapter: Optional[str]) -> None:
        if n:
            self._tokens.inc(n, tags={"version": version, "adapter": adapter or "-"})

    def ttft(self, seconds: float, version: str) -> None:
        self._ttft.observe(seconds, tags={"version": version})

    def batch(self, size: int) -> None:
        self.batches += 1
        self.rows += size
        self.max_batch = max(self.max_batch, size)
        self._batch.observe(size)

    def cache_event(self, kind: str, name: str, seconds: float) -> None:
        self._cache.inc(1, tags={"event": kind})
        if kind == "load":
            self._load.observe(seconds)


@serve.deployment(name="rayft-openai")
@serve.ingress(api)
class OpenAIServer:
    def __init__(self, serve_cfg: dict, model_path: str, tracking_uri: Optional[str] = None,
                 security_cfg: Optional[dict] = None, submitted_by: Optional[str] = None,
                 keys: Optional[list[dict]] = None):
        from rayft.security.config import SecurityConfig

        from .adapters import find_adapters
        from .engine import Engine, set_threads
        from .sources import resolve

        cfg = ServeConfig.model_validate(serve_cfg)
        self.cfg = cfg
        self.security = SecurityConfig.model_validate(security_cfg or {})
        set_threads(cfg.torch_threads or max(1, int(cfg.num_cpus_per_replica)))
        self._resolve = lambda uri: resolve(uri, tracking_uri)
        self.name = served_name(cfg, model_path)
        self.metrics = _Metrics()
        common = dict(mixed_adapter_batches=cfg.mixed_adapter_batches, quantization=cfg.quantization,
                      min_agreement=cfg.quantization_min_agreement, resolve=self._resolve, seed=cfg.seed,
                      security=self.security, device="cuda" if cfg.num_gpus_per_replica > 0 else "cpu",
                      log=lambda m: print(f"[rayft serve] {m}", flush=True))
        self.engines = {DEFAULT_VERSION: Engine(
            self._resolve(model_path), adapters=cfg.adapters, adapters_dir=cfg.adapters_dir,
            adapter_cache_size=cfg.adapter_cache_size, on_cache_event=self.metrics.cache_event, **common)}
        if cfg.ab_split:
            for v in cfg.ab_split.versions:
                self.engines[v.label] = Engine(self._resolve(v.model), **common)
        self.gate = Gate(cfg, self.name, find_adapters(cfg.adapters, cfg.adapters_dir), security_cfg, submitted_by,
                         keys=keys)
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    # -- the batch ----------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batch(self, jobs: list[_Job]) -> list[None]:
        """Decode a batch; versions (A/B) are separate models and take turns step by step. Every request of
        the batch gets its end marker whatever happens, so no caller waits forever."""
        try:
            await self._decode_batch(jobs)
        except Exception as e:  # noqa: BLE001 - answer these requests, keep the replica
            log.exception("batch failed")
            for j in jobs:
                j.queue.put_nowait(e)
        finally:
            for j in jobs:
                j.queue.put_nowait(_END)
        return [None] * len(jobs)

    async def _decode_batch(self, jobs: list[_Job]) -> None:
        self.metrics.batch(len(jobs))
        plans = []
        for version in dict.fromkeys(j.version for j in jobs):
            idx = [i for i, j in enumerate(jobs) if j.version == version]
            plans.append((idx, self.engines[version].generate([jobs[i].req for i in idx])))
        while plans:
            for plan in list(plans):
                idx, it = plan
                try:
                    outs = await asyncio.to_thread(next, it, None)
                except Exception as e:  # noqa: BLE001 - answer these requests, keep the replica
                    log.exception("generation failed")
                    for i in idx:
                        jobs[i].queue.put_nowait(e)
                    plans.remove(plan)
                    continue
                if outs is None:
                    plans.remove(plan)
                    continue
                now = time.perf_counter()
                for i, o in zip(idx, outs):
                    if o is not None:
                        if not jobs[i].started:
                            jobs[i].started = True
                            self.metrics.ttft(now - jobs[i].created, jobs[i].version)
                        jobs[i].queue.put_nowait(o)

    # -- routes -------------------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self):
        return {"status": "ok", "model": self.name}

    @api.get("/v1/models")
    async def models(self, request: Request):
        return self.gate.models(self._auth(request))

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        self._auth(request)
        eng = self.engines[DEFAULT_VERSION]
        return {"model": self.name, "inflight": self.gate.inflight,
                "adapter_cache": eng.cache.stats.as_dict() if eng.cache else None,
                "adapters_loaded": list(eng.cache.loaded) if eng.cache else [],
                "quantization_agreement": {k: e.agreement for k, e in self.engines.items()},
                "batches": self.metrics.batches, "max_batch_seen": self.metrics.max_batch,
                "mean_batch": self.metrics.rows / max(1, self.metrics.batches),
                "usage_by_tenant": self.gate.usage.by_tenant}

    # The body is read and validated by parse_request (400s naming the field); openapi_extra only documents it.
    @api.post("/v1/completions", openapi_extra=openapi_request_body(CompletionRequest))
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=openapi_request_body(ChatRequest))
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    # -- one request --------------------------------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool):
        who = self.gate.admit(request.headers.get("authorization"), request.url.path)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            raise APIError(400, "the request body is not valid JSON; send a JSON object with model and "
                           + ("messages" if chat else "prompt")) from None
        req = parse_request(ChatRequest if chat else CompletionRequest, body)
        version, adapter = self.gate.route(req.model, req.user)
        self.gate.check_infer(who, req.model, adapter)
        self.gate.check_rate(who)
        started = time.perf_counter()
        gen = self._gen_request(req, chat, version, adapter)
        self.gate.check_capacity()
        self.gate.inflight += 1
        job = _Job(version, gen, asyncio.Queue())
        task = asyncio.ensure_future(self.generate_batch(job))
        task.add_done_callback(self._finished)  # counts down even if the client goes away
        headers = {VERSION_HEADER: version}
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        path, p = request.url.path, len(gen.prompt_ids)

        def done(status: int, n: int) -> None:
            self.gate.finish(who, rid, path, req.model, version, adapter, status, p, n, started)

        tools = chat and req.tools_active  # the output is parsed for tool calls
        parallel = not chat or req.parallel_tool_calls is not False
        if req.stream:
            return StreamingResponse(self._sse(job, task, rid, req.model, chat, include_usage, done,
                                               ToolCallStream() if tools else None, parallel),
                                     headers=headers, media_type="text/event-stream")
        try:
            text, n, finish = await self._collect(job, rid)
        except APIError as e:
            done(e.status, 0)
            raise
        finally:
            gen.cancel.set()  # a no-op when done; stops the row when the client went away mid-answer
        done(200, n)
        usage = {"prompt_tokens": len(gen.prompt_ids), "completion_tokens": n, "total_tokens": len(gen.prompt_ids) + n}
        message = {"role": "assistant", "content": text}
        if tools:
            message, finish = answer_message(text, finish, parallel)
        choice = ({"index": 0, "message": message, "finish_reason": finish, "logprobs": None} if chat else
                  {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": req.model, "choices": [choice], "usage": usage},
                            headers=headers)

    async def _collect(self, job: _Job, rid: str):
        text, n, finish = "", 0, None
        while True:
            item = await job.queue.get()
            if item is _END:
                break
            if isinstance(item, Exception):
                raise _generation_error(item, rid, job.req.adapter)
            text += item.text
            n = item.completion_tokens
            if item.finish_reason:
                finish = item.finish_reason
        self.metrics.tokens(n, job.version, job.req.adapter)
        return text, n, finish or "stop"

    async def _sse(self, job: _Job, task, rid: str, model: str, chat: bool, include_usage: bool, done=None,
                   tools: Optional[ToolCallStream] = None, parallel: bool = True):
        """Server-sent events of one answer. With `tools`, content stops where a tool call begins (a possible marker
        is held back), and the calls follow as one `tool_calls` delta when the answer is complete."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: Optional[str], finish: Optional[str], role: bool = False, calls=None) -> str:
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                if calls:
                    delta = {"tool_calls": call_deltas(calls)}
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                          "choices": [choice]}) + "\n\n"

        n = 0
        try:
            if chat:
                yield chunk(None, None, role=True)
            pending = None
            while True:
                item, pending = (pending, None) if pending is not None else (await job.queue.get(), None)
                # A slow reader gets the tokens made meanwhile in one chunk rather than one event each.
                while not job.queue.empty() and not isinstance(item, Exception) and item is not _END \
                        and not item.finish_reason:
                    nxt = job.queue.get_nowait()
                    if nxt is _END or isinstance(nxt, Exception):
                        pending = nxt  # handled on the next turn, after this text is sent
                        break
                    item = type(item)(item.text + nxt.text, nxt.completion_tokens, nxt.finish_reason)
                if item is _END:
                    break
                if isinstance(item, Exception):
                    err = _generation_error(item, rid, job.req.adapter)
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                    break
                n = item.completion_tokens
                text = tools.feed(item.text) if tools is not None else item.text
                if item.finish_reason:
                    finish, calls = item.finish_reason, []
                    if tools is not None:
                        rest, calls = tools.finish()
                        text += rest
                        calls = calls if parallel else calls[:1]
                        finish = finish_reason(calls, finish)
                    if text:
                        yield chunk(text, None)
                    if calls:
                        yield chunk(None, None, calls=calls)
                    yield chunk(None if chat else "", finish)
                elif text:
                    yield chunk(text, None)
                    if self.cfg.stream_interval_s:
                        await asyncio.sleep(self.cfg.stream_interval_s)  # let tokens gather into the next event
            if include_usage:
                p = len(job.req.prompt_ids)
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model,
                                             "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": n,
                                                                      "total_tokens": p + n}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.req.cancel.set()  # the client may have gone: its row leaves the batch at the next step
            self.metrics.tokens(n, job.version, job.req.adapter)
            if done is not None:
                done(200, n)

    def _finished(self, task) -> None:
        self.gate.inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("batch failed: %s", task.exception())

    def _auth(self, request: Request):
        return self.gate.auth(request.headers.get("authorization"))

    def _gen_request(self, req, chat: bool, version: str, adapter: Optional[str]):
        from .engine import GenRequest

        engine = self.engines[version]
        tok = engine.tokenizer
        if chat:
            text = render_chat(req, tok, self.cfg.tool_call_parser is not None)
            field_name = "messages"
        else:
            text, field_name = req.prompt, "prompt"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            if tok.bos_token_id is None:
                raise APIError(400, f"{field_name}: empty; send at least one token of text", param=field_name)
            ids = [tok.bos_token_id]
        limit = self.cfg.max_tokens_limit
        max_tokens = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
        name = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:
            max_tokens = self.cfg.default_max_tokens
        elif not 1 <= max_tokens <= limit:
            raise APIError(400, f"{name}: {max_tokens} is out of range; use 1 to {limit} (serve.max_tokens_limit)",
                           param=name, code="invalid_value")
        ctx = engine.context_length
        if len(ids) >= ctx:
            raise APIError(400, f"{field_name}: {len(ids)} tokens does not fit the model's context of {ctx} tokens; "
                           f"shorten it", param=field_name, code="context_length_exceeded")
        if len(ids) + max_tokens > ctx:
            max_tokens = min(max_tokens, ctx - len(ids)) if req.max_tokens is None and name == "max_tokens" else max_tokens
            if len(ids) + max_tokens > ctx:
                raise APIError(400, f"{name}: {max_tokens} plus the {len(ids)}-token {field_name} exceeds the context "
                               f"of {ctx} tokens; ask for at most {ctx - len(ids)}", param=name,
                               code="context_length_exceeded")
        return GenRequest(ids, max_tokens, req.temperature, req.top_p, list(req.stop or []), req.seed, adapter,
                          cancel=threading.Event())


def build_app(cfg: ServeConfig, model_path: str, tracking_uri: Optional[str] = None, security=None, log=print):
    """The Serve application for this config (deployment options: replicas, autoscaling, resources).

    `security` (SecurityConfig): weight checks, decryption, and the inference policy and audit log, with
    RAYFT_POLICY_FILE / RAYFT_AUDIT_LOG resolved here, in the driver. On the vllm engine: rayft's ingress over one
    Ray Serve LLM deployment per served version (serve/ingress.py); on the hf engine: one deployment that is both."""
    from rayft.security.access import SUBMITTED_BY_ENV
    from rayft.security.config import SecurityConfig

    sec = security or SecurityConfig()
    sec = sec.model_copy(update={"policy_file": sec.resolved_policy_file, "audit_log": sec.resolved_audit_log})
    submitted_by = os.environ.get(SUBMITTED_BY_ENV) or None
    keys = load_keys(cfg)
    if keys is not None and not cfg.api_keys_file:  # from RAYFT_API_KEYS_FILE: the replica's config says keys are on
        cfg = cfg.model_copy(update={"api_keys_file": os.environ.get("RAYFT_API_KEYS_FILE")})
    if cfg.resolved_engine(log) == "vllm":
        from .adapters import find_adapters
        from .ingress import build_ingress

        name = served_name(cfg, model_path)
        sources = {DEFAULT_VERSION: (name, model_path)}
        for v in cfg.ab_split.versions if cfg.ab_split else []:
            sources[v.label] = (cfg.ab_split.name, v.model)
        return build_ingress(cfg, name, sources, find_adapters(cfg.adapters, cfg.adapters_dir), tracking_uri,
                             sec.model_dump(), submitted_by, keys)
    opts: dict[str, Any] = dict(
        # Serve lets a few more through than we accept so the replica itself answers 503 + Retry-After.
        max_ongoing_requests=cfg.max_ongoing_requests + 8,
        max_queued_requests=cfg.max_ongoing_requests * 4,
        ray_actor_options={"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
        # A replica being stopped (graceful stop, scale-down) lets its requests in flight finish first.
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_s,
        graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=3,  # a replica that cannot start fails the deploy soon, with its reason
    )
    if cfg.autoscaling:
        a = cfg.autoscaling
        opts["autoscaling_config"] = a.model_dump()  # our field names are Ray Serve's
    else:
        opts["num_replicas"] = cfg.num_replicas
    return OpenAIServer.options(**opts).bind(cfg.model_dump(), model_path, tracking_uri, sec.model_dump(), submitted_by,
                                             keys)


def check_sources(cfg: ServeConfig, model_path: str, tracking_uri: Optional[str] = None, security=None,
                  log=print) -> None:
    """The security checks each replica makes when it loads the model (and the A/B versions), made here first, so
    that a refusal (a tampered export, a registry copy whose manifest is not the registered one, a missing manifest
    under require_manifest, pickle weights, a wrong key) is one error naming the file, not a failed deployment.
    On the vllm engine also: the engine arguments, and every adapter's rank against serve.max_lora_rank."""
    from rayft.security.artifacts import check_for_load

    from .sources import resolve

    for source in [model_path, *(v.model for v in (cfg.ab_split.versions if cfg.ab_split else []))]:
        check_for_load(resolve(source, tracking_uri), security)
    if cfg.resolved_engine(log) != "vllm":
        return
    from .adapters import find_adapters
    from .llm import check_engine_kwargs, check_tool_call_parser

    check_engine_kwargs(cfg.engine_kwargs)
    check_tool_call_parser(cfg.engine_kwargs.get("tool_call_parser", cfg.tool_call_parser))
    for name, uri in find_adapters(cfg.adapters, cfg.adapters_dir).items():
        rank = adapter_rank(resolve(uri, tracking_uri), security)
        if rank is not None and rank > cfg.max_lora_rank:
            raise ServeStartError(f"adapter {name!r} ({uri}) has LoRA rank {rank}, above serve.max_lora_rank "
                                  f"{cfg.max_lora_rank}; raise serve.max_lora_rank to at least {rank}, or serve it on "
                                  f"the hf engine (serve.engine: hf)")


def adapter_rank(path: str, security=None) -> Optional[int]:
    """The largest LoRA rank of a PEFT adapter folder (its `r` and `rank_pattern`), after its manifest check."""
    from rayft.security.artifacts import opened_for_load

    if not os.path.isdir(path):
        return None
    with opened_for_load(path, security) as local:
        config_path = os.path.join(local, "adapter_config.json")
        if not os.path.isfile(config_path):
            return None
        with open(config_path) as f:
            conf = json.load(f)
    return max([int(conf.get("r") or 0), *(int(r) for r in (conf.get("rank_pattern") or {}).values())])


def replica_failure(app_name: str, fallback: str) -> str:
    """The reason a replica gave for failing to start, in one line: the last `SomeError: message` line of the
    deployment's status message (Ray puts the replica's traceback there), else `fallback`."""
    import re

    try:
        status = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - Serve already gone: the fallback says what we know
        return fallback
    texts = [status.message or ""] if status else []
    texts += [d.message or "" for d in (status.deployments.values() if status else [])]
    reasons = []
    for text in texts:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^\s*([\w.]*(?:Error|Exception)):\s*(.*)$", line)
            if not m or m.group(2).startswith("Traceback") or m.group(1).startswith("ray.exceptions"):
                continue
            reason = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if nxt and not nxt.startswith(("File ", "Traceback", "For further information")):
                reason += f" {nxt}"  # a pydantic or wrapped error: its detail is on the next line
            reasons.append(reason)
    return reasons[-1] if reasons else fallback


def start(cfg: ServeConfig, model_path: str, tracking_uri: Optional[str] = None, app_name: str = "rayft",
          blocking: bool = False, security=None, log=print):
    """Check the sources, start Serve's HTTP proxy on cfg.host:cfg.port (once per Ray) and deploy the app;
    returns its handle. A replica that fails to start raises ServeStartError with its reason in one line."""
    check_sources(cfg, model_path, tracking_uri, security, log)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    try:
        return serve.run(build_app(cfg, model_path, tracking_uri, security, log), name=app_name,
                         route_prefix=cfg.route_prefix, blocking=blocking)
    except RuntimeError as e:
        reason = replica_failure(app_name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        with contextlib.suppress(Exception):
            serve.delete(app_name, _blocking=True)
        raise ServeStartError(f"the server could not start: {reason}") from None


class StopRequested(BaseException):
    """SIGTERM or SIGINT reached a serving process: stop gracefully (a BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (what systemd and Kubernetes send) and SIGINT (Ctrl-C) raise StopRequested in the main thread
    instead of Ray's handler, which prints a crash trace and aborts. Only the first one counts: a second signal
    during the stop is ignored, so the stop itself runs to its end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum, _frame):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise StopRequested(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_server(app_name: str, grace_s: float, log=print) -> None:
    """Graceful stop: delete the app (the proxy routes no new request to it; each replica waits for its requests in
    flight, at most `grace_s`, before it exits), then stop Serve and disconnect from (or stop) Ray."""
    import ray

    t0 = time.monotonic()
    with contextlib.suppress(Exception):  # an app that failed or is gone: nothing to drain
        serve.delete(app_name, _blocking=True)
    log(f"requests in flight finished or timed out after {time.monotonic() - t0:.1f} s; stopping Serve and Ray")
    serve.shutdown()
    ray.shutdown()  # a local Ray started by this process stops with it; on a cluster this only disconnects


def run_server(cfg: ServeConfig, model_path: str, tracking_uri: Optional[str] = None, smoke_test: bool = False,
               log=print, security=None, app_name: str = "rayft") -> int:
    """Deploy and serve until SIGTERM or Ctrl-C, then stop gracefully (exit code 0); with smoke_test, answer one
    /health and one completion, then stop."""
    with stop_signals():
        try:
            return _serve_until_stopped(cfg, model_path, tracking_uri, smoke_test, log, security, app_name)
        except StopRequested as e:
            log(f"{e.signal_name} received: refusing new requests, waiting up to {cfg.graceful_shutdown_s:g} s "
                f"(serve.graceful_shutdown_s) for requests in flight")
            stop_server(app_name, cfg.graceful_shutdown_s, log)
            log("stopped")
            return 0


def _serve_until_stopped(cfg: ServeConfig, model_path: str, tracking_uri: Optional[str], smoke_test: bool, log,
                         security, app_name: str) -> int:
    import urllib.request

    start(cfg, model_path, tracking_uri, app_name=app_name, security=security, log=log)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    base = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    name = served_name(cfg, model_path)
    log(f"serving {name!r} ({model_path}) at {base}/v1 (OpenAI-compatible; GET {base}/health)")
    keys = cfg.api_keys_file or os.environ.get("RAYFT_API_KEYS_FILE")
    log(f"API keys: {'required (' + keys + ')' if keys else 'off (loopback only)'}")
    if smoke_test:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
                log(f"GET /health -> {r.status} {r.read().decode()}")
            if not keys:
                body = json.dumps({"model": name, "prompt": "hello", "max_tokens": 8, "temperature": 0}).encode()
                req = urllib.request.Request(f"{base}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    out = json.loads(r.read())
                log(f"POST /v1/completions -> {r.status} {out['choices'][0]['text']!r} usage {out['usage']}")
        finally:
            serve.shutdown()
        return 0
    while True:  # the proxy and replicas run in Ray; this process only keeps them alive until a stop signal
        time.sleep(3600)
