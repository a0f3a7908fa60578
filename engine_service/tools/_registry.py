"""Tools: definition, argument validation, import-path loading and the registry.

A custom tool is a Python callable registered by import path in config::

    class Args(BaseModel):
        to: str

    @tool(description="Send an email.")
    async def send_email(args: Args, ctx: ToolContext) -> str: ...

or a plain function plus a JSON Schema (``@tool(input_schema={...})``), in
which case it receives the validated ``dict``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import jsonschema
import pydantic

from engine_service.core._errors import EngineError, ErrorKind
from engine_service.core._limits import MAX_DEPTH, too_deep
from engine_service.core._regex import SchemaValidator, check_schema
from engine_service.core._text import clean_text
from engine_service.core._types import InterruptKind, JsonObject
from engine_service.models import ToolSpec


def _ignore_event(kind: str, data: JsonObject) -> None:
    return None


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool knows about the call it serves."""

    run_id: str
    workspace_id: str
    call_id: str
    # The run's own directory for file and process tools (None when the host has none).
    workdir: Path | None = None
    # Emit a run event from inside a tool, e.g. ("api_call", {...metering...}).
    emit: Callable[[str, JsonObject], None] = _ignore_event
    # The full text of an earlier, truncated tool result of this run (None if unknown).
    fetch_result: Callable[[str], Awaitable[str | None]] | None = None
    # False when the run turned the sandbox's network off (it can only narrow the engine's).
    sandbox_network: bool | None = None


class ToolArgumentError(Exception):
    """The arguments do not match the tool's schema; the message says where."""


class ToolError(Exception):
    """A failure the model should see as is: the message becomes the error result.

    Other exceptions are reported as ``<tool> failed: <type>: <message>``.
    """


Handler = Callable[[Any, ToolContext], Awaitable[Any] | Any]


@dataclass(slots=True)
class Tool:
    """A tool the model can call."""

    name: str
    description: str
    input_schema: JsonObject
    handler: Handler | None = None
    model: type[pydantic.BaseModel] | None = None
    # Set for tools the engine answers through an interrupt instead of running.
    interrupt_kind: InterruptKind | None = None
    # Host capabilities the tool needs (e.g. "subprocess").
    capabilities: frozenset[str] = frozenset()
    # Safe to run again after a crash interrupted it.
    idempotent: bool = False
    # Set on a capability stub: the capabilities this host lacks for the real tool.
    missing: frozenset[str] = frozenset()
    _validator: Any = field(default=None, repr=False)

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.input_schema)

    def validate(self, arguments: JsonObject) -> Any:
        """Validated arguments (a model instance for pydantic tools) or ToolArgumentError."""
        if too_deep(arguments):
            raise ToolArgumentError(f"(root): nested deeper than {MAX_DEPTH} levels")
        if self.model is not None:
            try:
                return self.model.model_validate(arguments)
            except pydantic.ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
                )
                raise ToolArgumentError(problems) from None
        if self._validator is None:
            self._validator = SchemaValidator(self.input_schema)
        errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e.path) or '(root)'}: {e.message}" for e in errors[:5]
            )
            raise ToolArgumentError(problems)
        return arguments

    def describe(self, arguments: JsonObject) -> str:
        shown = json.dumps(arguments, ensure_ascii=False, sort_keys=True)
        if len(shown) > 200:
            shown = shown[:199] + "…"
        return f"Call {self.name} with {shown}"

    async def run(self, arguments: JsonObject, ctx: ToolContext) -> Any:
        if self.handler is None:
            raise RuntimeError(f"tool {self.name} has no handler")
        value = self.validate(arguments)
        result = self.handler(value, ctx)
        if inspect.isawaitable(result):
            result = await result
        return result


@overload
def tool(fn: Handler) -> Tool: ...


@overload
def tool(
    fn: None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    input_schema: JsonObject | None = None,
    idempotent: bool = False,
    capabilities: Iterable[str] = (),
) -> Callable[[Handler], Tool]: ...


def tool(
    fn: Handler | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    input_schema: JsonObject | None = None,
    idempotent: bool = False,
    capabilities: Iterable[str] = (),
) -> Tool | Callable[[Handler], Tool]:
    """Turn a function into a `Tool`; usable bare (``@tool``) or with options."""

    def wrap(func: Handler) -> Tool:
        return tool_from_callable(
            func,
            name=name,
            description=description,
            input_schema=input_schema,
            idempotent=idempotent,
            capabilities=capabilities,
        )

    return wrap if fn is None else wrap(fn)


def tool_from_callable(
    func: Handler,
    *,
    name: str | None = None,
    description: str | None = None,
    input_schema: JsonObject | None = None,
    idempotent: bool = False,
    capabilities: Iterable[str] = (),
) -> Tool:
    model: type[pydantic.BaseModel] | None = None
    if input_schema is None:
        params = list(inspect.signature(func).parameters.values())
        annotation = inspect.get_annotations(func, eval_str=True).get(params[0].name) if params else None
        if not (inspect.isclass(annotation) and issubclass(annotation, pydantic.BaseModel)):
            raise TypeError(
                f"tool {getattr(func, '__name__', func)!r}: annotate the first parameter with a "
                "pydantic model or pass input_schema={...}"
            )
        model = annotation
        input_schema = model.model_json_schema()
    doc = inspect.getdoc(func) or ""
    tool_name = name or str(getattr(func, "__name__", "tool"))
    return Tool(
        name=tool_name,
        description=description or doc or f"The {tool_name} tool.",
        input_schema=input_schema,
        handler=func,
        model=model,
        idempotent=idempotent,
        capabilities=frozenset(capabilities),
    )


def _import_attr(path: str, what: str = "") -> Any:
    """The attribute ``package.module:name`` names; EngineError (``cannot load <what> ...``) if absent.

    Shared by custom tools, hooks and ``resolve_auth``. A path without ``:`` asks for
    the attribute ``""`` and so fails as missing.
    """
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        label = f"{what} {path!r}" if what else repr(path)
        raise EngineError(
            "ERR_CONFIG", f"cannot load {label}: {exc}", kind=ErrorKind.INVALID_ARGUMENT
        ) from None


def load_tool(path: str) -> Tool:
    """Load ``package.module:attribute`` as a Tool (a Tool object or a callable)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise EngineError(
            "ERR_CONFIG",
            f"custom tool path {path!r} must look like 'package.module:name'",
            kind=ErrorKind.INVALID_ARGUMENT,
        )
    obj = _import_attr(path, "custom tool")
    if isinstance(obj, Tool):
        return obj
    if callable(obj):
        return tool_from_callable(obj)
    raise EngineError(
        "ERR_CONFIG", f"{path!r} is neither a Tool nor a callable", kind=ErrorKind.INVALID_ARGUMENT
    )


def load_hook(path: str) -> Callable[..., Any]:
    """Import ``package.module:name`` as a callable (hooks, resolvers)."""
    obj = _import_attr(path) if ":" in path else None
    if not callable(obj):
        raise EngineError("ERR_CONFIG", f"{path!r} is not a callable 'package.module:name'")
    return obj  # type: ignore[no-any-return]


ASK_USER = Tool(
    name="AskUser",
    description=(
        "Ask the user a question and wait for their answer. Use it when you need "
        "information or a choice only the user can give."
    ),
    input_schema={
        "type": "object",
        "properties": {"question": {"type": "string", "description": "The question to ask."}},
        "required": ["question"],
        "additionalProperties": False,
    },
    interrupt_kind=InterruptKind.INPUT,
)


AGENT_TOOL = "Agent"
# Started by the engine itself (core/_subagents.py), never through a handler. Calling it again
# after a crash resumes the subagent from its checkpoint, hence idempotent.
AGENT = Tool(
    name=AGENT_TOOL,
    description=(
        "Delegate a self-contained task to a subagent. It works on its own with the tools you give "
        "it (a subset of yours; all of yours when omitted) and its answer is this call's result. "
        "Several Agent calls in one turn run in parallel."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "task": {"type": "string", "minLength": 1, "description": "What the subagent must do."},
            "tools": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The tools it may use; only tools you have.",
            },
            "max_turns": {"type": "integer", "minimum": 1, "description": "Its turn budget."},
            "max_tokens": {"type": "integer", "minimum": 1, "description": "Its token budget."},
            "max_cost_usd": {"type": "number", "exclusiveMinimum": 0, "description": "Its cost budget."},
        },
        "required": ["task"],
        "additionalProperties": False,
    },
    idempotent=True,
)


def capability_stub(real: Tool, missing: frozenset[str]) -> Tool:
    """Same name, description and schema as ``real`` (the model still sees it), but it cannot run here."""
    return Tool(
        real.name, real.description, real.input_schema, missing=missing, capabilities=real.capabilities
    )


def capability_error(name: str, missing: frozenset[str]) -> str:
    """The structured error a stub returns when the run cannot be handed to a runner."""
    return json.dumps(
        {
            "error": "capability_missing",
            "tool": name,
            "missing": sorted(missing),
            "message": f"{name} cannot run on this host (it lacks {', '.join(sorted(missing))}). "
            "Answer without it, or say what you would have run.",
        }
    )


def client_tool(name: str, description: str, input_schema: JsonObject) -> Tool:
    """A tool defined by the caller, whose results the caller supplies."""
    return Tool(name, description, input_schema, interrupt_kind=InterruptKind.TOOL_RESULT)


class ToolRegistry:
    """The engine's tools by name, in registration order."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, t: Tool) -> None:
        if t.name in self._tools:
            raise EngineError(
                "ERR_CONFIG", f"tool {t.name!r} is registered twice", kind=ErrorKind.INVALID_ARGUMENT
            )
        if t.model is None:
            # A pattern RE2 refuses would match nothing at call time: say so at startup instead.
            try:
                check_schema(t.input_schema)
            except jsonschema.SchemaError as exc:
                raise EngineError(
                    "ERR_CONFIG",
                    f"tool {t.name!r} has an input schema the engine cannot use: {exc.message}",
                    kind=ErrorKind.INVALID_ARGUMENT,
                ) from None
        self._tools[t.name] = t

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools


async def call_tool(t: Tool, arguments: JsonObject, ctx: ToolContext) -> tuple[str, bool]:
    """Run a tool and render its result for the model: (text, is_error).

    Any exception a tool raises becomes an error result the model can react
    to; only cancellation propagates.
    """
    try:
        value = await t.run(arguments, ctx)
    except ToolArgumentError as exc:
        return clean_text(f"Invalid arguments for {t.name}: {exc}"), True
    except ToolError as exc:
        return clean_text(str(exc)), True
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a tool's failure is data for the model, not a crash
        return clean_text(f"{t.name} failed: {type(exc).__name__}: {exc}"), True
    # Whatever a tool returns (custom tools included) must be storable as UTF-8.
    return clean_text(render_result(value)), False


def render_result(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)
