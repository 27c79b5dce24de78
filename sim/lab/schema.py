"""Declared configs: pydantic models that refuse unknown keys, and their errors as ConfigError.

Every experiment table is a ConfigModel (frozen, unknown keys refused). A validation failure
becomes one reference.errors.ConfigError naming the full key path (e.g.
`engines.vllm.max_num_seqs`, `workload.clients[0]`) and what is allowed, taken from the model's
own declaration: the field's bounds, its Literal choices, the keys the table accepts. Checks that
span fields raise ConfigError(field, message, allowed) inside a validator, with the field
relative to the table being validated.

Scalars are strict: an integer field refuses "256", 256.0 and true; a number field refuses
strings and booleans but takes integers.
"""
from __future__ import annotations

import difflib
import functools
import math
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic import (BaseModel, BeforeValidator, ConfigDict, StrictBool, StrictInt, StrictStr, TypeAdapter,
                      ValidationError)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from reference.errors import ConfigError


class ConfigModel(BaseModel):
    """A table of an experiment file: frozen, unknown keys refused; built in Python, it raises ConfigError too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise config_error(e, type(self)) from None


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("float_type", "must be a number")
    if isinstance(value, float) and math.isnan(value):
        raise PydanticCustomError("finite_number", "must not be nan")
    return value


Int = StrictInt
Bool = StrictBool
Str = StrictStr
Number = Annotated[float, BeforeValidator(_number)]  # takes ints; inf only where a field says so


def finite(value: float, field: str) -> float:
    """value, or ConfigError when it is infinite."""
    if math.isinf(value):
        raise ConfigError(field, f"must be finite, got {value!r}", "finite numbers")
    return value


def validate(model: Any, data: Any, prefix: str = "") -> Any:
    """data validated as `model` (a ConfigModel class, or a type such as a tagged union of them),
    with the first error raised as a ConfigError under prefix."""
    try:
        return _adapter(model).validate_python(data)
    except ValidationError as e:
        raise config_error(e, model, prefix) from None


@functools.cache
def _adapter(model: Any) -> TypeAdapter:
    return TypeAdapter(model)


def config_error(e: ValidationError, model: Any, prefix: str = "") -> ConfigError:
    """The first error of a pydantic validation of `model` as a ConfigError naming its key path."""
    err = e.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    node = _walk(model, err["loc"])
    path = _join(prefix, node.path)
    kind, value = err["type"], err.get("input")
    original = ctx.get("error")
    if isinstance(original, ConfigError):
        return original.under(path)
    if kind == "extra_forbidden":
        parent = node.parent_keys
        close = difflib.get_close_matches(str(err["loc"][-1]), parent, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(path, f"unknown key{hint}", ", ".join(parent))
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = ctx.get("discriminator", "").strip("'")
        if tag.endswith("()"):  # a callable discriminator: the members' Literal field is the key
            tag = _tag_field(_strip(node.annotation)) or tag
        allowed = node.allowed()
        if kind == "union_tag_not_found":
            return ConfigError(_join(path, tag), "required", allowed)
        return ConfigError(_join(path, tag), f"unknown value {ctx.get('tag')!r}", allowed)
    allowed = node.allowed()
    if kind == "missing":
        return ConfigError(path, "required", allowed)
    if kind == "literal_error":
        return ConfigError(path, f"unknown value {value!r}", allowed)
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return ConfigError(path, f"must be a table, got {value!r}", allowed or "a table")
    what = {"int_type": "an integer", "bool_type": "true or false", "string_type": "a string",
            "float_type": "a number", "list_type": "a list", "tuple_type": "a list"}.get(kind)
    if what:
        return ConfigError(path, f"must be {what}, got {value!r} ({type(value).__name__})", allowed)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "finite_number"):
        return ConfigError(path, f"out of range, got {value!r}", allowed)
    return ConfigError(path, err["msg"], allowed)


def _join(a: str, b: str) -> str:
    if not b:
        return a
    if not a or b.startswith("["):
        return a + b
    return f"{a}.{b}"


class _Node:
    """Where a loc points in the declared models: its key path, its field declaration, its parent's keys."""

    def __init__(self, path: str, annotation: Any, info: FieldInfo | None, parent_keys: list[str]):
        self.path, self.annotation, self.info, self.parent_keys = path, annotation, info, parent_keys

    def allowed(self) -> str:
        """What the field takes, from its declaration: choices, or a kind of value and its bounds."""
        return _describe(self.annotation, self.info)


def _walk(model: Any, loc: tuple) -> _Node:
    """Follow loc through model's fields (nested models, dicts of models, lists, tagged unions)."""
    path, ann, info, parent = "", model, None, _keys(model)
    for item in loc:
        ann = _strip(ann)
        choices = _union_members(ann)
        if choices and isinstance(item, str) and item in choices:  # pydantic puts the union tag in loc
            ann = choices[item]
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            parent = _keys(ann)
            if item in ann.model_fields:
                info = ann.model_fields[item]
                ann = info.annotation
                if info.metadata:
                    ann = Annotated[(ann, *info.metadata)]
            else:
                ann, info = Any, None
            path = _join(path, str(item))
            continue
        origin = typing.get_origin(ann)
        args = typing.get_args(ann)
        if origin is dict:
            ann, info = args[1], None
            path = _join(path, str(item))
        elif origin in (list, tuple):
            ann, info = args[0], info
            path = f"{path}[{item}]"
        else:
            path = _join(path, str(item))
    return _Node(path, ann, info, parent)


def _keys(model: Any) -> list[str]:
    """The keys a table of this model accepts (fields a file does not spell, like an engine's name, left out)."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [k for k, f in model.model_fields.items() if not f.exclude]


def _strip(ann: Any) -> Any:
    """The type without Optional and Annotated wrappers (keeps tagged unions whole)."""
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            inner = typing.get_args(ann)[0]
            if _union_members(inner):
                return inner
            ann = inner
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann
            ann = args[0]
        else:
            return ann


def _union_members(ann: Any) -> dict[str, type]:
    """{tag: model} of a union of models told apart by a Literal field (empty if ann is not one)."""
    if typing.get_origin(ann) not in (Union, types.UnionType):
        return {}
    out = {}
    for m in typing.get_args(ann):
        if typing.get_origin(m) is Annotated:  # a member tagged for a callable discriminator
            m = typing.get_args(m)[0]
        if not (isinstance(m, type) and issubclass(m, BaseModel)):
            return {}
        tags = next((f.annotation for f in m.model_fields.values() if typing.get_origin(f.annotation) is Literal), None)
        for tag in typing.get_args(tags) if tags is not None else ():  # the first Literal field tells them apart
            out[tag] = m
    return out


def _tag_field(ann: Any) -> str:
    """The name of the Literal field that tells a tagged union's members apart."""
    for m in typing.get_args(ann):
        m = typing.get_args(m)[0] if typing.get_origin(m) is Annotated else m
        for name, f in getattr(m, "model_fields", {}).items():
            if typing.get_origin(f.annotation) is Literal:
                return name
    return ""


def _metadata(ann: Any) -> list:
    """Constraints attached to a type through Annotated (a Field(...) inside Annotated holds its own)."""
    out = []
    for m in typing.get_args(ann)[1:] if typing.get_origin(ann) is Annotated else ():
        out += list(m.metadata) if isinstance(m, FieldInfo) else [m]
    return out


def _describe(ann: Any, info: FieldInfo | None) -> str:
    bounds = []
    if typing.get_origin(ann) in (Union, types.UnionType):  # Optional[X]: describe X
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = args[0] if len(args) == 1 else ann
    for m in _metadata(ann):
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(m, attr, None) if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le, at.Interval)) else None
            if value is not None:
                bounds.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    base = _strip(ann)
    if typing.get_origin(base) is Literal:
        return " | ".join(str(a) for a in typing.get_args(base))
    members = _union_members(base)
    if members:
        return " | ".join(members)
    if typing.get_origin(base) in (list, tuple):
        inner = typing.get_args(base)[0]
        return _describe(inner, None) or "a list"
    if base is bool or base is StrictBool:
        return "true | false"
    kind = "integers" if base is int or _is(base, StrictInt) else "numbers" if _is(base, float) else ""
    if not kind:
        return "a table" if isinstance(base, type) and issubclass(base, BaseModel) else ""
    return kind + (" " + " and ".join(bounds) if bounds else "")


def _is(ann: Any, target: Any) -> bool:
    if ann is target:
        return True
    return typing.get_origin(ann) is Annotated and typing.get_args(ann)[0] is target or (
        typing.get_origin(target) is Annotated and ann is typing.get_args(target)[0])
