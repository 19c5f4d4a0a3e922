"""The shapes of the OpenAI JSON that the proxy reads, and one function that checks a value against them.

A client's request of the wrong shape is refused (400, naming the first wrong field); a backend's answer of the
wrong shape is relayed as it came, and what the proxy records of it keeps only the well-formed parts, so that
reading it (reassembling a stream, filling a span's typed columns) cannot fail.

A shape is a JSON type (``str``, ``bool``, ``dict``, ``list``), :data:`NUMBER`, a :class:`Whole` number in a
range, :class:`Many` (an array of one shape), :class:`Obj` (an object whose named fields have these shapes; other
fields are free) or a tuple of alternatives. ``null`` fits every shape: OpenAI's optional fields take it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

# Indexes of choices and tool calls; a stream's reassembly makes this many entries at most.
MAX_INDEX: Final = 1024


class _Number:
    """A JSON number (an integer or not), not a boolean."""


NUMBER: Final = _Number()


@dataclass(frozen=True)
class Whole:
    """A JSON integer (not a boolean) from ``low`` to ``high``."""

    low: int | None = None
    high: int | None = None


@dataclass(frozen=True)
class Many:
    item: Shape


@dataclass(frozen=True)
class Obj:
    fields: dict[str, Shape]
    required: tuple[str, ...] = ()


@dataclass(frozen=True)
class Misfit:
    """Where a value does not fit its shape, and how."""

    path: str
    text: str

    def __str__(self) -> str:
        return f"'{self.path}' {self.text}"


Shape = type | _Number | Whole | Many | Obj | tuple[Any, ...]
MISSING: Final = object()  # what :func:`clean` returns for a value of which nothing fits

# -- requests ---------------------------------------------------------------------------------------------

_FUNCTION_CALL = Obj({"name": str, "arguments": str})
_CONTENT = (str, Many(Obj({"type": str}, required=("type",))))
_MESSAGE = Obj(
    {
        "role": str,
        "content": _CONTENT,
        "name": str,
        "tool_call_id": str,
        "tool_calls": Many(Obj({"id": str, "type": str, "function": _FUNCTION_CALL})),
    },
    required=("role",),
)
_COMMON: dict[str, Shape] = {
    "model": str,
    "stream": bool,
    "stream_options": Obj({"include_usage": bool}),
    "n": Whole(1),
    "max_tokens": Whole(0),
    "max_completion_tokens": Whole(0),
    "temperature": NUMBER,
    "top_p": NUMBER,
    "presence_penalty": NUMBER,
    "frequency_penalty": NUMBER,
    "seed": Whole(),
    "stop": (str, Many(str)),
    "user": str,
    "logit_bias": dict,
}
CHAT_REQUEST: Final = Obj(
    {
        **_COMMON,
        "messages": Many(_MESSAGE),
        "logprobs": bool,
        "top_logprobs": Whole(0),
        "tools": Many(Obj({"type": str, "function": Obj({"name": str}, required=("name",))})),
        "tool_choice": (str, dict),
        "parallel_tool_calls": bool,
        "response_format": dict,
    }
)
TEXT_REQUEST: Final = Obj(
    {**_COMMON, "prompt": (str, Many((str, Whole(), Many(Whole())))), "logprobs": Whole(0), "echo": bool}
)

# -- responses --------------------------------------------------------------------------------------------

_INDEX = Whole(0, MAX_INDEX)
_TOKEN_IDS = Many(Whole())
_USAGE = Obj({"prompt_tokens": Whole(), "completion_tokens": Whole(), "total_tokens": Whole()})
_LOGPROBS = Obj({"content": Many(Obj({"logprob": NUMBER}, required=("logprob",))), "token_logprobs": Many(NUMBER)})
_TOOL_CALL = Obj({"index": _INDEX, "id": str, "type": str, "function": _FUNCTION_CALL})
_REPLY = Obj({"role": str, "content": str, "tool_calls": Many(_TOOL_CALL)})
_CHOICE: dict[str, Shape] = {
    "index": _INDEX,
    "text": str,
    "logprobs": _LOGPROBS,
    "token_ids": _TOKEN_IDS,
    "prompt_token_ids": _TOKEN_IDS,
    "finish_reason": str,
    "stop_reason": (str, Whole()),
}
_RESPONSE: dict[str, Shape] = {"id": str, "model": str, "object": str, "usage": _USAGE, "prompt_token_ids": _TOKEN_IDS}
RESPONSE: Final = Obj({**_RESPONSE, "choices": Many(Obj({**_CHOICE, "message": _REPLY}))}, required=("choices",))
CHUNK: Final = Obj({**_RESPONSE, "choices": Many(Obj({**_CHOICE, "delta": _REPLY}))})


def clean(value: Any, shape: Shape) -> tuple[Any, Misfit | None]:
    """``value`` less what does not fit ``shape`` (:data:`MISSING` if nothing fits), and the first misfit.

    In an object, a field that does not fit is left out; in an array of objects, an item that is not one (or
    lacks a required field); an array of anything else is kept whole or not at all (its items' positions
    matter). ``value`` itself is not changed. A value that fits (nearly always) is checked without a copy, by
    a test compiled once per shape; only one that does not is walked again to say where.
    """
    test = _TESTS.get(id(shape))
    if test is None:
        test = _TESTS[id(shape)] = _compile(shape)
    return (value, None) if test(value) else _clean(value, shape, "")


Test = Callable[[Any], bool]
_TESTS: dict[int, Test] = {}
_NONE = type(None)


def _compile(shape: Shape) -> Test:
    """A function that tells whether a value fits ``shape`` (null fits any shape)."""
    if isinstance(shape, tuple):
        alternatives = [_compile(s) for s in shape]
        return lambda v: any(test(v) for test in alternatives)
    if isinstance(shape, Obj):
        return _object_test(shape)
    if isinstance(shape, Many):
        scalars = _scalar_types(shape.item)
        if scalars is not None:  # the common arrays (token ids, logprobs, strings): one pass in C
            return lambda v: v is None or (type(v) is list and set(map(type, v)) <= scalars)
        item = _compile(shape.item)
        return lambda v: v is None or (type(v) is list and all(map(item, v)))
    if isinstance(shape, Whole):
        low = shape.low if shape.low is not None else -math.inf
        high = shape.high if shape.high is not None else math.inf
        return lambda v: v is None or (type(v) is int and low <= v <= high)
    if isinstance(shape, _Number):
        return lambda v: v is None or type(v) is int or type(v) is float
    kind = shape
    return lambda v: v is None or isinstance(v, kind)


def _object_test(shape: Obj) -> Test:
    tests = {name: _compile(s) for name, s in shape.fields.items()}
    fields = list(tests.items())
    required = shape.required

    def test(v: Any) -> bool:
        if v is None:
            return True
        if type(v) is not dict:
            return False
        for name in required:
            if name not in v:
                return False
        if len(v) < len(fields):  # look at the fewer: the value's fields or the shape's
            for name, item in v.items():
                field_test = tests.get(name)
                if field_test is not None and not field_test(item):
                    return False
        else:
            for name, field_test in fields:
                if name in v and not field_test(v[name]):
                    return False
        return True

    return test


def _scalar_types(shape: Shape) -> frozenset[type] | None:
    """The Python types of the values that fit ``shape``, when they tell (not for ranges, objects, arrays)."""
    if shape is NUMBER:
        return frozenset({int, float, _NONE})
    if shape == Whole():
        return frozenset({int, _NONE})
    if shape is str:
        return frozenset({str, _NONE})
    return None


def _clean(value: Any, shape: Shape, path: str) -> tuple[Any, Misfit | None]:
    if value is None:
        return value, None
    if isinstance(shape, tuple):
        fits = next((s for s in shape if _kind_fits(value, s)), None)
        if fits is None:
            return MISSING, Misfit(path, f"must be {' or '.join(map(_describe, shape))}, not {_json_type(value)}")
        shape = fits
    if not _kind_fits(value, shape):
        return MISSING, Misfit(path, f"must be {_describe(shape)}, not {_json_type(value)}")
    if isinstance(shape, Whole) and not (
        (shape.low is None or value >= shape.low) and (shape.high is None or value <= shape.high)
    ):
        return MISSING, Misfit(path, f"must be {_describe(shape)}, not {value}")
    if isinstance(shape, Obj):
        return _clean_object(value, shape, path)
    if isinstance(shape, Many):
        return _clean_array(value, shape, path)
    return value, None


def _clean_object(value: dict[str, Any], shape: Obj, path: str) -> tuple[Any, Misfit | None]:
    prefix = f"{path}." if path else ""
    missing = next((name for name in shape.required if name not in value), None)
    if missing is not None:
        return MISSING, Misfit(prefix + missing, "is missing")
    first: Misfit | None = None
    out = value
    for name, field_shape in shape.fields.items():
        if name not in value:
            continue
        item, problem = _clean(value[name], field_shape, prefix + name)
        if item is not value[name]:
            if out is value:
                out = dict(value)
            if item is MISSING:
                del out[name]
            else:
                out[name] = item
        first = first or problem
    return out, first


def _clean_array(value: list[Any], shape: Many, path: str) -> tuple[Any, Misfit | None]:
    kept: list[Any] = []
    first: Misfit | None = None
    for i, item in enumerate(value):
        fitted, problem = _clean(item, shape.item, f"{path}[{i}]")
        first = first or problem
        if fitted is MISSING and not isinstance(shape.item, Obj):
            return MISSING, first
        if fitted is not MISSING:
            kept.append(fitted)
    return (value if first is None else kept), first


def _kind_fits(value: Any, shape: Shape) -> bool:
    if isinstance(shape, _Number | Whole):
        kind: type | tuple[type, ...] = (int, float) if isinstance(shape, _Number) else int
        return isinstance(value, kind) and not isinstance(value, bool)
    if isinstance(shape, Obj):
        return isinstance(value, dict)
    if isinstance(shape, Many):
        return isinstance(value, list)
    assert isinstance(shape, type)
    return isinstance(value, shape)


_NAMES: dict[type, str] = {str: "a string", bool: "a boolean", dict: "an object", list: "an array", int: "an integer"}


def _describe(shape: Shape) -> str:
    if isinstance(shape, Whole):
        if shape.low is not None and shape.high is not None:
            return f"an integer from {shape.low} to {shape.high}"
        return f"an integer of at least {shape.low}" if shape.low is not None else "an integer"
    if isinstance(shape, _Number):
        return "a number"
    if isinstance(shape, Obj):
        return "an object"
    if isinstance(shape, Many):
        return "an array"
    assert isinstance(shape, type)
    return _NAMES.get(shape) or shape.__name__


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return _NAMES.get(type(value), type(value).__name__)
