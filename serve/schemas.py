"""OpenAI request models and error bodies.

Requests are validated at the boundary; a bad one becomes a 400 in OpenAI's error shape whose `param`
names the field and whose message says the value and the fix. Fields OpenAI accepts but rayft does not
implement are refused when set to anything but their no-op value, never silently ignored.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 503: "overloaded_error"}.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def openai_app(title: str = "rayft"):
    """A FastAPI app whose errors are answered in OpenAI's shape: an APIError as it is, anything else as a 500 with a
    request id. A bug answers its request and the replica keeps serving; the client never gets the exception's text
    (paths, internals), the replica's log has the detail under that id. Both engines' ingresses use it."""
    import logging
    import uuid

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    log = logging.getLogger("rayft.serve")
    app = FastAPI(title=title, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_error(_request, exc: Exception):
        rid = "req-" + uuid.uuid4().hex[:24]
        log.error("request %s failed", rid, exc_info=exc)
        return JSONResponse(APIError(500, f"internal server error (request id {rid}); the server's log has the "
                                          f"details under that id").body(), status_code=500)

    return app


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    max_tokens: Optional[StrictInt] = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, strict=True)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = Field(default=None, ge=-(2**63), le=2**63 - 1)  # torch seeds are 64-bit
    stream: StrictBool = False
    stream_options: Optional["StreamOptions"] = None
    n: StrictInt = 1
    user: Optional[str] = None
    presence_penalty: float = Field(default=0.0, strict=True)
    frequency_penalty: float = Field(default=0.0, strict=True)
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give up to 4 non-empty stop strings")
        return stops

    @field_validator("n")
    @classmethod
    def _one(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported; send several requests for several answers")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported; leave it out or send 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported; leave it out")
        return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: StrictBool = False
    logprobs: Optional[int] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError(f"give one prompt (a string); got a list of {len(v)} — send one request per prompt")
            v = v[0]
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported; leave it out")
        return v

    @field_validator("logprobs", "suffix", "best_of")
    @classmethod
    def _unsupported(cls, v, info):
        if v is not None and not (info.field_name == "best_of" and v == 1):
            raise ValueError(f"{info.field_name} is not supported; leave it out")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as a string (OpenAI's layout)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v):
        try:
            obj = json.loads(v)
        except ValueError as e:
            raise ValueError(f"not valid JSON ({e}); send the arguments as a JSON object in a string") from None
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON {type(obj).__name__}; send the arguments as a JSON object in a string")
        return v


class ToolCall(BaseModel):
    """An earlier assistant turn's call, sent back as part of the conversation."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Checked in this order, each against the fields before it, so an error names the field that is wrong.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: Optional[list[ToolCall]] = Field(default=None, validate_default=True)  # assistant only
    tool_call_id: Optional[str] = Field(default=None, validate_default=True)  # tool only: the call it answers
    content: Optional[Union[str, list[TextPart]]] = Field(default=None, validate_default=True)
    name: Optional[str] = None
    refusal: Optional[str] = None  # what the openai client echoes back of an assistant message; not rendered

    @field_validator("tool_calls")
    @classmethod
    def _calls_by_assistant(cls, v, info):
        role = info.data.get("role")
        if v and role != "assistant":
            raise ValueError(f"tool_calls is for assistant messages; this one's role is {role!r}")
        return v

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, v, info):
        role = info.data.get("role")
        if role == "tool" and not v:
            raise ValueError("a tool message needs tool_call_id: the id of the assistant's call it answers")
        if v is not None and role not in ("tool", None):
            raise ValueError(f"tool_call_id is for tool messages; this one's role is {role!r}")
        return v

    @field_validator("content")
    @classmethod
    def _has_content(cls, v, info):
        if v is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("missing; only an assistant message with tool_calls may leave it out")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema
    strict: Optional[bool] = None  # kept for the client's sake; the hf engine does not constrain decoding


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Annotated[Union[Annotated[Literal["none", "auto", "required"], Tag("mode")],
                                          Annotated[NamedToolChoice, Tag("named")]],
                                    Discriminator(lambda v: "mode" if isinstance(v, str) else "named")]] = None
    parallel_tool_calls: Optional[StrictBool] = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs is not supported; leave it out")
        return v

    def check(self) -> None:
        """Checks across fields: a 400 naming the field."""
        names: list[str] = []
        for i, t in enumerate(self.tools or ()):
            if t.function.name in names:
                raise APIError(400, f"tools[{i}].function.name: {t.function.name!r} is declared twice; give each "
                               f"tool a distinct name", param=f"tools[{i}].function.name", code="invalid_value")
            names.append(t.function.name)
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            wanted = repr(choice) if isinstance(choice, str) else f"a named function ({choice.function.name!r})"
            raise APIError(400, f"tool_choice: {wanted} needs tools; send the tools the model may call, or leave "
                           f"tool_choice out", param="tool_choice", code="invalid_value")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice.function.name: {choice.function.name!r} is not one of the declared "
                           f"tools ({', '.join(names)})", param="tool_choice.function.name", code="invalid_value")
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            for c in m.tool_calls or ():
                calls.add(c.id)
            if m.role == "tool" and m.tool_call_id not in calls:
                raise APIError(400, f"messages[{i}].tool_call_id: {m.tool_call_id!r} answers no earlier assistant "
                               f"tool call; a tool message follows the assistant message whose tool_calls carry "
                               f"that id", param=f"messages[{i}].tool_call_id", code="invalid_value")

    @property
    def tools_active(self) -> bool:
        """Whether the tools are rendered and the output parsed for calls (tools given, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatRequest.model_rebuild()


def openapi_request_body(kind: type[BaseModel]) -> dict:
    """The OpenAPI `requestBody` of a route that reads its JSON itself: the model's JSON schema, its $defs inlined
    (an operation's schema cannot point into its own $defs), so /openapi.json describes the real body."""
    schema = kind.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def parse_request(kind: type[BaseModel], body: Any) -> BaseModel:
    """Validate a JSON body; the first problem becomes a 400 naming the field, its value and the fix."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", param=None)
    try:
        req = kind.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _dotted(err["loc"])
        kind_ = err["type"]
        if kind_ == "extra_forbidden":
            msg = f"{loc}: unknown field; remove it (allowed: {', '.join(sorted(kind.model_fields))})"
        elif kind_ == "missing":
            msg = f"{loc}: required field is missing"
        else:
            text = err["msg"].removeprefix("Value error, ")
            msg = f"{loc}: {_short(err.get('input'))} is not valid: {text}"
        raise APIError(400, msg, param=loc, code="invalid_value") from None
    check = getattr(req, "check", None)
    if check is not None:
        check()
    return req


def _dotted(loc: tuple) -> str:
    # pydantic puts union member names (str, list[...]) in the location; keep only the field path.
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("str", "list[str]", "list[TextPart]", "TextPart", "mode", "named") or p.startswith(("list[", "function-")):
            continue
        else:
            parts.append(("." if parts else "") + p)
    return "".join(parts) or "(body)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
