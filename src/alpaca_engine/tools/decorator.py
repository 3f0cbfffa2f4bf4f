"""``@tool``: a typed Python function becomes a Tool with schemas derived from its signature.

Pydantic derives the input schema from the parameters and the output schema from the return
annotation, so the contract the model sees and the types the function receives cannot drift.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, get_type_hints, overload

from pydantic import BaseModel, ConfigDict, TypeAdapter, create_model

from .base import ApprovalRule, Tool, ToolContext
from .breaker import BreakerPolicy
from .contracts import DRAFT
from .retry import NO_RETRY, RetryPolicy
from .threads import run_sync


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def _input_model(
    fn: Callable[..., Any], hints: dict[str, Any]
) -> tuple[type[BaseModel], str | None]:
    fields: dict[str, Any] = {}
    ctx_param = None
    for pname, param in inspect.signature(fn).parameters.items():
        annotation = hints.get(pname, Any)
        if annotation is ToolContext:
            ctx_param = pname
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, default)
    model = create_model(
        f"{fn.__name__}_input", __config__=ConfigDict(extra="forbid"), **fields
    )
    return model, ctx_param


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    schema = dict(schema)
    schema.pop("title", None)
    schema["$schema"] = DRAFT
    return schema


def make_tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    capabilities: Iterable[str] = (),
    retry: RetryPolicy = NO_RETRY,
    breaker: BreakerPolicy | None = None,
    timeout: float | None = 30.0,
    approval: ApprovalRule = "never",
    cost: float = 0.0,
) -> Tool:
    hints = get_type_hints(fn)
    input_model, ctx_param = _input_model(fn, hints)
    ret = hints.get("return")
    output_adapter: TypeAdapter[Any] | None = None
    output_schema = None
    if ret is not None and ret is not type(None):
        output_adapter = TypeAdapter(ret)
        output_schema = _clean_schema(output_adapter.json_schema())
    is_async = inspect.iscoroutinefunction(fn)

    async def invoke(args: dict[str, Any], ctx: ToolContext) -> Any:
        parsed = input_model.model_validate(args)
        kwargs = {k: getattr(parsed, k) for k in type(parsed).model_fields}
        if ctx_param:
            kwargs[ctx_param] = ctx
        if is_async:
            result = await fn(**kwargs)
        else:
            result = await run_sync(fn, **kwargs)  # a daemon thread: see tools/threads.py
        if output_adapter is not None:
            return output_adapter.dump_python(result, mode="json", warnings=False)
        return result

    return Tool(
        name=name or fn.__name__,
        description=description if description is not None else _description(fn),
        input_schema=_clean_schema(input_model.model_json_schema()),
        output_schema=output_schema,
        invoke=invoke,
        capabilities=frozenset(capabilities),
        retry=retry,
        breaker=breaker,
        timeout=timeout,
        approval=approval,
        cost=cost,
    )


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    capabilities: Iterable[str] = (),
    retry: RetryPolicy = NO_RETRY,
    breaker: BreakerPolicy | None = None,
    timeout: float | None = 30.0,
    approval: ApprovalRule = "never",
    cost: float = 0.0,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Decorate a typed function (sync or async) to make it a governed Tool."""
    if fn is not None:
        return make_tool(fn)
    return lambda f: make_tool(f, **options)
