"""The one bounded JSON parser for every JSON a checkpoint carries (safetensors headers, indexes).

Python's `json.loads` trusts its input in ways a checkpoint must not be trusted: it nests
until RecursionError, turns a 100 000-digit number into a ValueError (or into seconds of
CPU), accepts `NaN`/`Infinity`, lets the last of two equal keys win silently, and returns
whatever type the text holds. Here every one of those is a `CheckpointError` naming the
file: size, depth and number length are capped, non-finite numbers, duplicate keys and
lone surrogates are refused, and `expect` checks the shape the caller relies on.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from graft.errors import CheckpointError
from graft.storage import as_path, open_file

MAX_BYTES = 64 << 20
"""Default cap on a JSON file's size; an index of a 10 000-shard model is a few MB."""
MAX_DEPTH = 32
"""Deeper than any checkpoint JSON graft reads (a safetensors header is 3 levels deep)."""
MAX_NUMBER_CHARS = 40
"""A u64 has 20 digits; a float's repr fewer than 25. Anything longer is not a size or offset."""

_CORRUPT = "the file is corrupt or was not written by a checkpoint tool; write or copy it again"


class _Refused(ValueError):
    """A JSON construct the bounded parser refuses (raised inside the decoder's hooks)."""


def _check_number(text: str) -> str:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    return text


def _parse_int(text: str) -> int:
    return int(_check_number(text))


def _parse_float(text: str) -> float:
    value = float(_check_number(text))
    if not math.isfinite(value):  # 1e999 overflows to inf
        raise _Refused(f"the number {text} is not finite")
    return value


def _parse_constant(name: str):
    raise _Refused(f"{name} is not JSON (no NaN or Infinity in a checkpoint)")


def _check_text(text: str) -> str:
    try:
        text.encode("utf-8")  # "\ud800" decodes to a lone surrogate, which no file name or key can be
    except UnicodeEncodeError:
        raise _Refused(f"the string {text!r} holds a lone UTF-16 surrogate") from None
    return text


def _object(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {key!r} appears twice in one object")
        out[_check_text(key)] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_int=_parse_int, parse_float=_parse_float,
                            parse_constant=_parse_constant, strict=True)


def _depth_and_strings(value: Any, depth: int = 1) -> None:
    """Refuses nesting deeper than MAX_DEPTH and lone surrogates in string values."""
    if depth > MAX_DEPTH:
        raise _Refused(f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for v in value.values():
            _depth_and_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _depth_and_strings(v, depth + 1)
    elif isinstance(value, str):
        _check_text(value)


def parse(raw: bytes | str, source: str | os.PathLike, what: str, *, expect: type = dict,
          trailing_spaces: bool = False) -> Any:
    """The JSON value of `raw`, of type `expect`; anything else is a CheckpointError naming `source`.

    trailing_spaces: the text must start with its value (no leading whitespace) and may be
    followed only by spaces (0x20): the safetensors header rule.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    except UnicodeDecodeError as e:
        raise CheckpointError(source, f"{what} is not UTF-8 ({e.reason} at byte {e.start})", _CORRUPT) from e
    try:
        if trailing_spaces:
            value, end = _DECODER.raw_decode(text)  # raw_decode skips no leading whitespace
            if text[end:].strip(" "):
                raise _Refused(f"bytes other than space padding after the JSON value, at character {end}")
        else:
            value = _DECODER.decode(text)
        _depth_and_strings(value)
    except RecursionError:
        # The C scanner guards its recursion; a nesting this deep is refused like any other.
        raise CheckpointError(source, f"{what} is not valid JSON: nesting deeper than {MAX_DEPTH} levels",
                              _CORRUPT) from None
    except ValueError as e:  # _Refused, JSONDecodeError, or the interpreter's own cap on int digits
        raise CheckpointError(source, f"{what} is not valid JSON: {e}", _CORRUPT) from e
    if not isinstance(value, expect):
        raise CheckpointError(source, f"{what} is a JSON {type_name(value)}, not {type_name(expect)}",
                              _CORRUPT)
    return value


def read(path: str | os.PathLike, what: str, *, expect: type = dict, max_bytes: int = MAX_BYTES) -> Any:
    """Parse the JSON file `path`, reading at most `max_bytes` of it (a bigger file is refused)."""
    path = as_path(path)
    with open_file(path) as f:
        # Sized by the file, not by the cap: read(n) allocates n bytes before reading any.
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        raw = f.read(min(size, max_bytes) + 1)
    if len(raw) > max_bytes:
        raise CheckpointError(path, f"{what} is larger than {max_bytes} bytes, too large to be one",
                              "point graft at the checkpoint's real index or header")
    return parse(raw, path, what, expect=expect)


def type_name(value: Any) -> str:
    """'object', 'array', 'string'... for a JSON value or a Python type, for messages."""
    kind = value if isinstance(value, type) else type(value)
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
             bool: "boolean", type(None): "null"}
    return names.get(kind, kind.__name__)


def is_uint(value: Any, bits: int = 64) -> bool:
    """A JSON integer that fits an unsigned `bits`-bit field (not a bool, not a float)."""
    return type(value) is int and 0 <= value < (1 << bits)
