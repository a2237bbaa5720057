"""The plugin API: what a method implements, and how its parameter model is used.

A method plugin subclasses :class:`Method`::

    class Rollout(Method):
        class Params(BaseModel):
            start_layer: int = Field(0, ge=0, description="first block used",
                                     json_schema_extra={"role": "layer"})

        def capture(self, params, model, target):
            return CaptureSpec(attention_layers=range(model.n_layers))

        def run(self, trace, params, *, target, cancel, backend=None):
            yield Progress(0.0, "rollout")
            ...
            return Heatmap(...)

``run`` is a generator (a :mod:`job <explorer.core.jobs>`): it yields progress, checks ``cancel``
between steps and returns a typed result. The one ``Params`` model drives the Qt form, the CLI's
``--param name=value`` flags and saved sessions. A field's ``json_schema_extra={"role": ...}``
('layer', 'head', 'query') lets the form bound it by the loaded model.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from explorer.core.validation import first_error
from explorer.core.jobs import CancelToken, Job
from explorer.core.target import Target
from explorer.core.trace import CaptureSpec, ModelInfo, Trace

__all__ = [
    "Method",
    "NoParams",
    "ParamField",
    "param_fields",
    "parse_params",
    "params_to_strings",
    "resolve_layer",
    "ParamError",
]


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamError(ValueError):
    """Bad parameter values (one line naming the parameter)."""


class Method:
    """Base class of every method plugin (see module docstring)."""

    Params: ClassVar[type[BaseModel]] = NoParams

    def capture(self, params: BaseModel, model: ModelInfo, target: Target) -> CaptureSpec:
        """What the trace must hold for these parameters (resolved against ``model``)."""
        return CaptureSpec()

    def run(self, trace: Trace, params: BaseModel, *, target: Target, cancel: CancelToken,
            backend: Any = None) -> Job:
        raise NotImplementedError


def resolve_layer(layer: int, n_layers: int, name: str = "layer") -> int:
    """Resolve a possibly negative block index; ``ParamError`` when out of range (the message
    gives the valid range, so that one line says what to pass instead)."""
    j = layer + n_layers if layer < 0 else layer
    if not 0 <= j < n_layers:
        raise ParamError(f"{name} {layer} is out of range for a model with {n_layers} blocks: use 0..{n_layers - 1}, "
                         f"or -{n_layers}..-1 counting from the last")
    return j


@dataclass(frozen=True)
class ParamField:
    """A parameter as forms and the CLI see it."""

    name: str
    kind: Literal["int", "float", "bool", "choice", "str", "list"]
    default: Any
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    role: str | None = None  # 'layer', 'head', 'query'
    optional: bool = False


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def param_fields(model: type[BaseModel]) -> list[ParamField]:
    """Describe the fields of a parameter model for a generated form or CLI help."""
    out = []
    for name, f in model.model_fields.items():
        tp, optional = _unwrap_optional(f.annotation)
        origin = typing.get_origin(tp)
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        lo = hi = None
        for m in f.metadata:
            lo = getattr(m, "ge", lo) if getattr(m, "ge", None) is not None else (getattr(m, "gt", None) if getattr(m, "gt", None) is not None else lo)
            hi = getattr(m, "le", hi) if getattr(m, "le", None) is not None else (getattr(m, "lt", None) if getattr(m, "lt", None) is not None else hi)
        if origin is Literal:
            kind, choices = "choice", tuple(typing.get_args(tp))
        elif tp is bool:
            kind, choices = "bool", ()
        elif tp is int:
            kind, choices = "int", ()
        elif tp is float:
            kind, choices = "float", ()
        elif origin in (list, tuple):
            kind, choices = "list", ()
        else:
            kind, choices = "str", ()
        out.append(
            ParamField(
                name=name,
                kind=kind,
                default=f.get_default(call_default_factory=True),
                description=f.description or "",
                minimum=lo,
                maximum=hi,
                choices=choices,
                role=extra.get("role"),
                optional=optional,
            )
        )
    return out


def _coerce(field: ParamField, text: str) -> Any:
    if field.optional and text.strip().lower() in ("none", "null", ""):
        return None
    if field.kind == "list":
        text = text.strip()
        if text.startswith("["):
            return json.loads(text)
        return [t.strip() for t in text.split(",") if t.strip()]
    if field.kind == "choice":
        for c in field.choices:
            if str(c) == text:
                return c
        return text
    return text


def parse_params(model: type[BaseModel], values: Mapping[str, Any] | None = None) -> BaseModel:
    """Validate parameter values (strings from the CLI, or typed values) into ``model``.

    Raises :class:`ParamError` naming the first bad parameter and the allowed names.
    """
    values = dict(values or {})
    fields = {f.name: f for f in param_fields(model)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        allowed = ", ".join(fields) or "none"
        raise ParamError(f"unknown parameter(s) {', '.join(unknown)}; this method takes: {allowed}")
    data = {k: _coerce(fields[k], v) if isinstance(v, str) else v for k, v in values.items()}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where, msg = first_error(exc)
        raise ParamError(f"parameter {where}: {msg}") from None


def params_to_strings(params: BaseModel) -> dict[str, str]:
    """The CLI form of parameter values: ``parse_params(type(p), params_to_strings(p)) == p``."""
    out = {}
    for name, value in params.model_dump().items():
        if value is None:
            out[name] = "none"
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        else:
            out[name] = str(value)
    return out
