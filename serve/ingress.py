"""rayft's ingress in front of the vllm engine: one Ray Serve deployment composed with one Ray Serve LLM deployment per
served version (serve/llm.py).

    GET  /health                 liveness (no key needed)
    GET  /v1/models              the model, its adapters (with their parent) and A/B names
    POST /v1/completions         vLLM's completions (n, logprobs, echo, prompt lists, penalties, stream, ...)
    POST /v1/chat/completions    vLLM's chat (n, logprobs, response_format / JSON mode, tools, stream, ...)

Before a request reaches vLLM, the Gate (serve/gate.py) makes the same checks as on the hf engine: API key (401),
the key's adapters and the access policy with its audit line (403), the model name routed to a version and an adapter
(404 for an unknown one, never an answer from the base), the A/B draw, the replica's limit on requests in flight (503
with Retry-After). Every answer carries `x-rayft-model-version`. vLLM's own refusals (prompt too long, a bad value)
come back as 400s with vLLM's message; a field vLLM does not know is refused here, naming it.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from .config import ServeConfig
from .gate import VERSION_HEADER, Gate
from .schemas import APIError, openai_app

log = logging.getLogger("rayft.serve")

api = openai_app()


def request_error(e: ValidationError) -> APIError:
    """vLLM's request model refused the body: a 400 naming the first bad field, its value and what is wanted."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    value = json.dumps(err.get("input"), default=str)
    if len(value) > 80:
        value = value[:77] + "..."
    return APIError(400, f"{where}: {err['msg']} (got {value})", param=where, code="invalid_value")


def malformed_request(cls, body: dict, exc: Exception) -> APIError:
    """A body vLLM's request model could not even read: a 400 naming the first field whose value is not of its type
    (checked field by field, without the model's validators), else one that says the body is malformed."""
    from pydantic import TypeAdapter

    for name, value in body.items():
        field = cls.model_fields.get(name)
        if field is None:
            continue
        try:
            TypeAdapter(field.annotation).validate_python(value)
        except ValidationError as e:
            return request_error(ValidationError.from_exception_data(
                e.title, [{**err, "loc": (name, *err["loc"])} for err in e.errors(include_url=False)]))
        except Exception:  # noqa: BLE001 - a type pydantic cannot check alone: look at the next field
            continue
    return APIError(400, f"the request body could not be read as a {cls.__name__} ({type(exc).__name__}: {exc}); "
                    f"check the fields' types against /openapi.json", code="invalid_value")


def _int_beyond_64_bits(value, where: str = "") -> Optional[tuple[str, int]]:
    """(field path, value) of the first integer in a JSON body outside the signed 64-bit range, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**63 else (where or "body", value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _int_beyond_64_bits(item, f"{where}[{key}]" if isinstance(key, int) else
                                    f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _is_error(item) -> bool:
    return type(item).__name__ == "ErrorResponse" or (isinstance(item, dict) and "error" in item)


def _engine_error(item) -> APIError:
    """vLLM's ErrorResponse -> rayft's: same status (400 for a request vLLM refuses), vLLM's message."""
    err = item.error if hasattr(item, "error") else item["error"]
    get = (lambda k: getattr(err, k, None)) if not isinstance(err, dict) else err.get
    status = int(get("code") or 500) if str(get("code") or "").isdigit() else 500
    param = get("param")
    message = get("message") or "the engine refused the request"
    return APIError(status, message, param=param, code="invalid_value" if status == 400 else None)


def _dump(item) -> dict:
    return item.model_dump(mode="json", exclude_none=False) if hasattr(item, "model_dump") else item


def _sse_packet(item, usage: dict, send_usage: bool) -> str:
    """Server-sent events for one item (or a batch) of vLLM's stream. The usage it reports is recorded in `usage`;
    a usage-only chunk the client did not ask for (rayft asks vLLM for it, to count tokens) is not sent."""
    items = item if isinstance(item, list) else [item]
    out = []
    for x in items:
        if isinstance(x, str):
            if x.strip() == "data: [DONE]":
                continue  # sent once, at the end
            data = x.strip()[len("data: "):] if x.strip().startswith("data: ") else None
            parsed = None
            if data and '"usage"' in data:
                try:
                    parsed = json.loads(data)
                except ValueError:
                    parsed = None
            if parsed and parsed.get("usage"):
                usage["prompt"] = parsed["usage"].get("prompt_tokens") or usage["prompt"]
                usage["completion"] = parsed["usage"].get("completion_tokens") or usage["completion"]
                if not send_usage and not parsed.get("choices"):
                    continue
            out.append(x if x.endswith("\n\n") else x + "\n\n")
        elif _is_error(x):
            out.append("data: " + json.dumps(_engine_error(x).body()) + "\n\n")
        else:
            u = getattr(x, "usage", None)
            if u is not None:
                usage["prompt"] = u.prompt_tokens or usage["prompt"]
                usage["completion"] = u.completion_tokens or usage["completion"]
                if not send_usage and not getattr(x, "choices", None):
                    continue
            out.append("data: " + (x.model_dump_json() if hasattr(x, "model_dump_json") else json.dumps(x)) + "\n\n")
    return "".join(out)


def request_body_doc(chat: bool) -> dict:
    """/openapi.json's request body of a generation route: vLLM's request model as the ingress takes it (`model`
    required, no field outside the model's), so that clients and fuzzers see the real body."""
    try:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
    except ImportError:  # no vLLM here: the routes stay undocumented, nothing else changes
        return {}
    from .schemas import openapi_request_body

    doc = openapi_request_body(ChatCompletionRequest if chat else CompletionRequest)
    schema = doc["requestBody"]["content"]["application/json"]["schema"]
    schema["required"] = sorted({"model", *schema.get("required", [])})
    schema["additionalProperties"] = False
    return doc


@serve.deployment(name="rayft-ingress", ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class LLMIngress:
    def __init__(self, serve_cfg: dict, name: str, catalogue: dict[str, str], engines: dict,
                 security_cfg: Optional[dict] = None, submitted_by: Optional[str] = None,
                 keys: Optional[list[dict]] = None):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.name = name
        # One ingress replica admits for all engine replicas: serve.max_ongoing_requests is per engine replica.
        self.gate = Gate(self.cfg, name, catalogue, security_cfg, submitted_by,
                         capacity=self.cfg.max_ongoing_requests * self.cfg.most_replicas, keys=keys)
        self.engines = engines  # version -> DeploymentHandle of its Ray Serve LLM deployment
        from .llm import engine_kwargs

        # vLLM takes n up to 16384 (VLLM_MAX_N_SEQUENCES): one request could fill the engine's batch many times over.
        self.max_n = int(engine_kwargs(self.cfg, with_lora=False).get("max_num_seqs") or 1)
        self._handles: dict[tuple, Any] = {}

    @api.get("/health")
    async def health(self):
        return {"status": "ok", "model": self.name, "engine": "vllm"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        return self.gate.models(self.gate.auth(request.headers.get("authorization")))

    # The body is read and checked by _parse (400s naming the field); openapi_extra only documents it.
    @api.post("/v1/completions", openapi_extra=request_body_doc(chat=False))
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions", openapi_extra=request_body_doc(chat=True))
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    # -- one request --------------------------------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool):
        who = self.gate.admit(request.headers.get("authorization"), request.url.path)
        started, rid = time.perf_counter(), "req-" + uuid.uuid4().hex[:24]
        model, version, adapter = None, None, None

        def finish(status: int, prompt: int = 0, completion: int = 0) -> None:
            self.gate.finish(who, rid, request.url.path, model, version, adapter, status, prompt, completion, started)

        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                body = None
            if not isinstance(body, dict):
                raise APIError(400, "the request body is not a JSON object; send one with model and "
                               + ("messages" if chat else "prompt"))
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise APIError(400, "model: missing; send the name of a served model (GET /v1/models lists them)",
                               param="model")
            user = body.get("user") if isinstance(body.get("user"), str) else None
            version, adapter = self.gate.route(model, user)
            self.gate.check_infer(who, model, adapter)
            self.gate.check_rate(who)
            req = self._parse(body, chat)
            self.gate.check_capacity()
        except APIError as e:
            finish(e.status)
            raise
        self.gate.inflight += 1
        headers = {VERSION_HEADER: version}
        done = False
        try:
            client_wants_usage = bool(getattr(getattr(req, "stream_options", None), "include_usage", False))
            if getattr(req, "stream", False) and not client_wants_usage:
                # Asked of vLLM so the tokens count for limits and usage; the usage chunk is not sent on.
                stream_options_cls = type(req).model_fields["stream_options"].annotation.__args__[0]
                req.stream_options = stream_options_cls(include_usage=True)
            stream = self._call(version, model if adapter else None, req, chat)
            first = await stream.__anext__()
            first_item = first[0] if isinstance(first, list) and first else first
            if _is_error(first_item):
                raise _engine_error(first_item)
            if not getattr(req, "stream", False):
                usage = getattr(first_item, "usage", None)
                finish(200, getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
                return JSONResponse(_dump(first_item), headers=headers)
            done = True  # the stream's generator counts the request down and finishes it when it ends
            return StreamingResponse(self._sse(first, stream, finish, client_wants_usage), headers=headers,
                                     media_type="text/event-stream")
        except StopAsyncIteration:
            finish(500)
            raise APIError(500, "the engine returned no answer; retry") from None
        except APIError as e:
            finish(e.status)
            raise
        except Exception as e:  # noqa: BLE001 - an engine failure: a request id, the detail in the log
            log.error("request %s: generation failed", rid, exc_info=e)
            finish(500)
            what = f"adapter {adapter!r} could not be loaded or run" if adapter else "generation failed"
            raise APIError(500, f"{what} (request id {rid}); the server's log has the details under that id",
                           code="generation_failed") from None
        finally:
            if not done:
                self.gate.inflight -= 1

    def _parse(self, body: dict, chat: bool):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
        from vllm.exceptions import VLLMValidationError

        cls = ChatCompletionRequest if chat else CompletionRequest
        too_big = _int_beyond_64_bits(body)
        if too_big:  # vLLM's models take any int, but it reaches the engine as msgpack: a 500 (found by fuzzing)
            where, value = too_big
            raise APIError(400, f"{where}: {value} does not fit in 64 bits", param=where, code="invalid_value")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise request_error(e) from None
        except VLLMValidationError as e:  # vLLM's own checks across fields (e.g. a tool_choice naming no tool)
            param = e.parameter or None
            raise APIError(400, f"{param + ': ' if param else ''}{e.args[0] if e.args else e}", param=param,
                           code="invalid_value") from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
            # vLLM's model validators read some fields before their types are checked and fail on a wrong type
            # (`"messages": false`, `"structured_outputs": []`): a bad request, not a server error
            raise malformed_request(cls, body, e) from None
        extra = sorted((req.model_extra or {}).keys())
        if extra:  # vLLM would ignore it with a log line; a client deserves to know its option did nothing
            raise APIError(400, f"{extra[0]}: not a field of this endpoint's {'chat ' if chat else ''}completion "
                           f"requests; remove it", param=extra[0], code="unknown_field")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        asked = body.get(name)
        limit = self.cfg.max_tokens_limit
        if asked is None:
            req.max_tokens = self.cfg.default_max_tokens
            if chat:
                req.max_completion_tokens = None
        elif not 1 <= int(asked) <= limit:
            raise APIError(400, f"{name}: {asked} is out of range; use 1 to {limit} (serve.max_tokens_limit)",
                           param=name, code="invalid_value")
        n = getattr(req, "n", None)
        if n is not None and not 1 <= n <= self.max_n:
            raise APIError(400, f"n: {n} is out of range; use 1 to {self.max_n} (the engine's max_num_seqs, "
                           f"serve.max_batch_size)", param="n", code="invalid_value")
        if chat:
            for i, m in enumerate(req.messages):
                # vLLM's model also takes messages in gpt-oss's harmony layout (an `author` instead of a `role`), which
                # its chat renderer then fails on (KeyError: 'role', a 500; found by fuzzing)
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise APIError(400, f"messages[{i}].role: missing; every message needs a role (system, user, "
                                   f"assistant, tool)", param=f"messages[{i}].role", code="invalid_value")
            from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request

            req = _sanitize_chat_completion_request(req)  # Ray 2.60's fix for pickling message iterables
        return req

    def _call(self, version: str, lora_model: Optional[str], req, chat: bool):
        key = (version, lora_model)
        handle = self._handles.get(key)
        if handle is None:
            opts: dict[str, Any] = {"stream": True}
            if lora_model:
                opts["multiplexed_model_id"] = lora_model  # Serve routes it to a replica that has it loaded
            handle = self._handles[key] = self.engines[version].options(**opts)
        method = handle.chat if chat else handle.completions
        return method.remote(req, None).__aiter__()

    async def _sse(self, first, stream, finish, send_usage: bool):
        usage = {"prompt": 0, "completion": 0}
        status = 200
        try:
            yield _sse_packet(first, usage, send_usage)
            async for item in stream:
                yield _sse_packet(item, usage, send_usage)
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            status = 500
            rid = "req-" + uuid.uuid4().hex[:24]
            log.error("request %s: stream failed", rid, exc_info=e)
            yield "data: " + json.dumps(APIError(500, f"generation failed (request id {rid})").body()) + "\n\n"
        finally:
            self.gate.inflight -= 1
            finish(status, usage["prompt"], usage["completion"])

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        self.gate.auth(request.headers.get("authorization"))
        return {"model": self.name, "engine": "vllm", "inflight": self.gate.inflight,
                "usage_by_tenant": self.gate.usage.by_tenant}


def build_ingress(cfg: ServeConfig, name: str, sources: dict[str, tuple[str, str]], catalogue: dict[str, str],
                  tracking_uri: Optional[str], security: dict, submitted_by: Optional[str],
                  keys: Optional[list[dict]] = None):
    """The application: the ingress bound to one Ray Serve LLM deployment per version.

    `sources`: version -> (the model id clients send, the model source)."""
    from .llm import build_deployment

    engines = {version: build_deployment(cfg, model_id, version, source, catalogue if version == "default" else {},
                                         tracking_uri, security)
               for version, (model_id, source) in sources.items()}
    opts: dict[str, Any] = dict(max_ongoing_requests=cfg.max_ongoing_requests * cfg.most_replicas + 8,
                                graceful_shutdown_timeout_s=cfg.graceful_shutdown_s,
                                graceful_shutdown_wait_loop_s=0.5)
    return LLMIngress.options(**opts).bind(cfg.model_dump(), name, catalogue, engines, security, submitted_by, keys)
