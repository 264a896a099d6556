"""Go's ``encoding/json`` where the wire depends on it: lenient decoding into structs, and ``Marshal``.

EdgeComet's clients send bodies that Go decodes leniently (field names match case-insensitively,
unknown fields are ignored, ``null`` leaves a field alone, a repeated field overwrites), and the
Cache Daemon answers a bad body with ``400 invalid json: `` + Go's error text. Queue members must be
the exact bytes ``json.Marshal`` writes, or a Go component and this daemon would queue the same URL
twice. Validation follows Go's scanner so that syntax errors win over type errors, as in Go.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from cachesvc.recache.urlnorm import go_decode_utf8


class GoJSONError(ValueError):
    """Go's ``err.Error()`` for a body it cannot decode."""


# --- validation: Go's scanner and its messages ------------------------------------------------

_SPACE = b" \t\r\n"
MAX_DEPTH = 10000  # Go's maxNestingDepth: objects and arrays nested deeper are a syntax error


def _quote_char(c: int) -> str:
    if c == 0x27:
        return "'\\''"
    if c == 0x22:
        return "'\"'"
    named = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v", 0x5C: "\\\\"}
    if c in named:
        return f"'{named[c]}'"
    if c < 0x20 or c == 0x7F:
        return f"'\\x{c:02x}'"
    if 0x80 <= c < 0xA0 or c == 0xAD:
        return f"'\\u{c:04x}'"
    return f"'{chr(c)}'"


class _Scanner:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.i = 0

    def fail(self, context: str) -> GoJSONError:
        if self.i >= len(self.d):
            return GoJSONError("unexpected end of JSON input")
        return GoJSONError(f"invalid character {_quote_char(self.d[self.i])} {context}")

    def peek(self) -> int:
        return self.d[self.i] if self.i < len(self.d) else -1

    def skip_space(self) -> None:
        while self.i < len(self.d) and self.d[self.i] in _SPACE:
            self.i += 1

    def check(self) -> int:
        """Scan the whole document; return its nesting depth (arrays and objects)."""
        self.skip_space()
        depth = self.value()
        self.skip_space()
        if self.i < len(self.d):
            raise self.fail("after top-level value")
        return depth

    def value(self) -> int:
        """Scan one value, containers with a stack of their own (not recursion), as Go's scanner does.

        Go refuses the object or array that opens a level beyond ``MAX_DEPTH`` with "exceeded max
        depth" at that byte; until then the first byte that is wrong gives the error.
        """
        stack = bytearray()  # the open containers: "{" or "["
        deepest = 0
        while True:
            # A value starts here.
            c = self.peek()
            if c == 0x7B or c == 0x5B:
                if len(stack) >= MAX_DEPTH:
                    raise self.fail("exceeded max depth")
                stack.append(c)
                deepest = max(deepest, len(stack))
                self.i += 1
                self.skip_space()
                if self.peek() != c + 2:  # not "}" or "]": the first member or element follows
                    if c == 0x7B:
                        self.key()
                    continue
                self.i += 1
                stack.pop()
            elif c == 0x22:
                self.string()
            elif c == 0x2D or 0x30 <= c <= 0x39:
                self.number()
            elif c in (0x74, 0x66, 0x6E):
                self.literal({0x74: b"true", 0x66: b"false", 0x6E: b"null"}[c])
            else:
                raise self.fail("looking for beginning of value")
            # A value ended: close the containers it completes, up to one that goes on.
            while stack:
                self.skip_space()
                c = self.peek()
                if c == 0x2C:
                    self.i += 1
                    self.skip_space()
                    if stack[-1] == 0x7B:
                        self.key()
                    break
                if c != stack[-1] + 2:
                    raise self.fail("after object key:value pair" if stack[-1] == 0x7B else "after array element")
                self.i += 1
                stack.pop()
            else:
                return deepest

    def key(self) -> None:
        """An object's key and its colon, then the spaces before the value."""
        if self.peek() != 0x22:
            raise self.fail("looking for beginning of object key string")
        self.string()
        self.skip_space()
        if self.peek() != 0x3A:
            raise self.fail("after object key")
        self.i += 1
        self.skip_space()

    def string(self) -> None:
        self.i += 1
        while True:
            c = self.peek()
            if c < 0:
                raise self.fail("")
            self.i += 1
            if c == 0x22:
                return
            if c < 0x20:
                self.i -= 1
                raise self.fail("in string literal")
            if c == 0x5C:
                e = self.peek()
                if e in b'"\\/bfnrt':
                    self.i += 1
                elif e == 0x75:
                    self.i += 1
                    for _ in range(4):
                        h = self.peek()
                        if h < 0 or h not in b"0123456789abcdefABCDEF":
                            raise self.fail("in \\u hexadecimal character escape")
                        self.i += 1
                else:
                    raise self.fail("in string escape code")

    def digits(self) -> None:
        while 0x30 <= self.peek() <= 0x39:
            self.i += 1

    def number(self) -> None:
        if self.peek() == 0x2D:
            self.i += 1
            if not 0x30 <= self.peek() <= 0x39:
                raise self.fail("in numeric literal")
        if self.peek() == 0x30:
            self.i += 1
        else:
            self.digits()
        if self.peek() == 0x2E:
            self.i += 1
            if not 0x30 <= self.peek() <= 0x39:
                raise self.fail("after decimal point in numeric literal")
            self.digits()
        if self.peek() in (0x65, 0x45):
            self.i += 1
            if self.peek() in (0x2B, 0x2D):
                self.i += 1
            if not 0x30 <= self.peek() <= 0x39:
                raise self.fail("in exponent of numeric literal")
            self.digits()

    def literal(self, word: bytes) -> None:
        self.i += 1
        for expected in word[1:]:
            if self.peek() != expected:
                raise self.fail(f"in literal {word.decode()} (expecting {_quote_char(expected)})")
            self.i += 1


def validate(data: bytes) -> None:
    """Raise :class:`GoJSONError` with Go's message if *data* is not one JSON value."""
    _Scanner(data).check()


# --- decoding into struct specs -----------------------------------------------------------------


class _Number(str):
    """A number literal kept as written, so integer fields can judge it as Go does."""


class _Object(list):  # type: ignore[type-arg]
    """Key/value pairs in document order (repeated keys matter)."""


@dataclass(frozen=True)
class Field:
    name: str  # the JSON name
    kind: str  # "int", "string", "[]int", "[]string"


@dataclass(frozen=True)
class Struct:
    go_name: str  # e.g. "RecacheAPIRequest"
    fields: tuple[Field, ...]
    package: str = "types"

    def zero(self) -> dict[str, Any]:
        return {f.name: (0 if f.kind == "int" else "" if f.kind == "string" else None) for f in self.fields}


def _kind(value: Any) -> str:
    if isinstance(value, _Object):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, _Number):
        return "number"
    return "string"


def _fold(name: str) -> str:
    # Go matches field names with Unicode simple folding; the Kelvin sign and long s fold to k and s.
    return name.replace("\u212a", "k").replace("\u017f", "s").lower()


SHALLOW = 100  # json.loads recurses (and Python's stack is about 1,000 frames): deeper documents use _build

_WS = re.compile(r"[ \t\r\n]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def _build(text: str) -> Any:
    """What ``json.loads`` (with this module's hooks) makes of *text*, a document the scanner accepted,
    with a stack instead of recursion: Go accepts 10,000 levels of nesting."""
    containers: list[list[Any]] = []  # open arrays and _Objects
    keys: list[str] = []  # the key each open _Object's next value belongs to
    i = _WS.match(text).end()  # type: ignore[union-attr]
    while True:
        c = text[i]
        value: Any
        if c in "{[":
            container: list[Any] = _Object() if c == "{" else []
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            if text[i] not in "}]":
                containers.append(container)
                if c == "{":
                    i = _key(text, i, keys)
                continue
            value, i = container, i + 1
        elif c == '"':
            value, i = scanstring(text, i + 1)
        elif c in "tfn":
            value = {"t": True, "f": False, "n": None}[c]
            i += 4 if c != "f" else 5
        else:
            number = _NUMBER.match(text, i)
            assert number is not None  # the scanner accepted it
            value, i = _Number(number.group()), number.end()
        while containers:
            top = containers[-1]
            top.append((keys.pop(), value) if isinstance(top, _Object) else value)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i] == ",":
                i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                if isinstance(top, _Object):
                    i = _key(text, i, keys)
                break
            value, i = containers.pop(), i + 1
        else:
            return value


def _key(text: str, i: int, keys: list[str]) -> int:
    """Read the key at *i* and its colon into *keys*; the index of the value that follows."""
    key, i = scanstring(text, i + 1)
    keys.append(key)
    i = _WS.match(text, i).end()  # type: ignore[union-attr]
    return _WS.match(text, i + 1).end()  # type: ignore[union-attr]


def decode(data: bytes, spec: Struct) -> dict[str, Any]:
    """Decode *data* as Go decodes it into *spec*; a Go ``nil`` slice is ``None``."""
    depth = _Scanner(data).check()
    text = go_decode_utf8(data)
    if depth > SHALLOW:
        value = _build(text)
    else:
        value = json.loads(
            text,
            object_pairs_hook=_Object,
            parse_int=_Number,
            parse_float=_Number,
            parse_constant=lambda c: (_ for _ in ()).throw(GoJSONError(f"invalid character {c[0]!r}")),
        )
    result = spec.zero()
    if value is None:
        return result
    if not isinstance(value, _Object):
        raise GoJSONError(f"json: cannot unmarshal {_kind(value)} into Go value of type {spec.package}.{spec.go_name}")
    exact = {f.name: f for f in spec.fields}
    folded = {_fold(f.name): f for f in spec.fields}
    error: GoJSONError | None = None
    for key, raw in value:
        f = exact.get(key) or folded.get(_fold(key))
        if f is None:
            continue
        try:
            if raw is None:
                if f.kind.startswith("[]"):
                    result[f.name] = None
                continue
            result[f.name] = _convert(raw, f, spec)
        except GoJSONError as e:
            error = error or e
    if error is not None:
        raise error
    return result


def _convert(raw: Any, f: Field, spec: Struct) -> Any:
    where = f"Go struct field {spec.go_name}.{f.name} of type"
    if f.kind.startswith("[]"):
        item = f.kind[2:]
        if not isinstance(raw, list) or isinstance(raw, _Object):
            raise GoJSONError(f"json: cannot unmarshal {_kind(raw)} into {where} {f.kind}")
        out = []
        error = None
        for element in raw:
            try:
                out.append(_scalar(element, item, where, zero_for_null=True))
            except GoJSONError as e:
                error = error or e
                out.append(0 if item == "int" else "")
        if error is not None:
            raise error
        return out
    return _scalar(raw, f.kind, where)


def _scalar(raw: Any, kind: str, where: str, zero_for_null: bool = False) -> Any:
    if raw is None and zero_for_null:
        return 0 if kind == "int" else ""
    if kind == "int":
        if not isinstance(raw, _Number):
            raise GoJSONError(f"json: cannot unmarshal {_kind(raw)} into {where} int")
        try:
            number = int(raw, 10)
        except ValueError:
            raise GoJSONError(f"json: cannot unmarshal number {raw} into {where} int") from None
        if not -(2**63) <= number < 2**63:
            raise GoJSONError(f"json: cannot unmarshal number {raw} into {where} int")
        return number
    if not isinstance(raw, str) or isinstance(raw, _Number):
        raise GoJSONError(f"json: cannot unmarshal {_kind(raw)} into {where} string")
    return _no_surrogates(raw)


def _no_surrogates(s: str) -> str:
    # A \u escape of a lone surrogate decodes to U+FFFD in Go.
    if any("\ud800" <= ch <= "\udfff" for ch in s):
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in s)
    return s


# --- encoding -----------------------------------------------------------------------------------

_SHORT_ESCAPES = {0x22: b'\\"', 0x5C: b"\\\\", 0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}


def encode_string(s: str | bytes) -> bytes:
    """A JSON string exactly as Go's ``json.Marshal`` writes it (HTML-safe, Go 1.22+ escapes)."""
    raw = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    out = bytearray(b'"')
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c < 0x80:
            if c in _SHORT_ESCAPES:
                out += _SHORT_ESCAPES[c]
            elif c < 0x20 or c in (0x3C, 0x3E, 0x26):
                out += b"\\u%04x" % c
            else:
                out.append(c)
            i += 1
            continue
        width = 2 if 0xC2 <= c <= 0xDF else 3 if 0xE0 <= c <= 0xEF else 4 if 0xF0 <= c <= 0xF4 else 0
        chunk = raw[i : i + width] if width and i + width <= n else b""
        try:
            ch = chunk.decode("utf-8") if chunk else None
        except UnicodeDecodeError:
            ch = None
        if ch is None:
            out += b"\\ufffd"
            i += 1
        elif ch in ("\u2028", "\u2029"):
            out += b"\\u%04x" % ord(ch)
            i += width
        else:
            out += chunk
            i += width
    out += b'"'
    return bytes(out)


def encode_object(pairs: list[tuple[str, Any]]) -> bytes:
    """Compact JSON of *pairs* in order, as Go marshals a struct (ints, bools, strings, nested)."""
    parts = []
    for key, value in pairs:
        parts.append(encode_string(key) + b":" + encode_value(value))
    return b"{" + b",".join(parts) + b"}"


def encode_value(value: Any) -> bytes:
    if value is None:
        return b"null"
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return format_float(value).encode()
    if isinstance(value, (str, bytes)):
        return encode_string(value)
    if isinstance(value, dict):
        return encode_object(list(value.items()))
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(encode_value(v) for v in value) + b"]"
    raise TypeError(f"cannot encode {type(value).__name__}")


def format_float(x: float) -> str:
    """Go's float64 JSON form for ordinary values: integral floats without ``.0`` (``30``, ``12.5``)."""
    if x == int(x) and abs(x) < 1e21:
        return str(int(x))
    return repr(x)
