"""containerd's filter syntax, so `fusesnap list` selects snapshots the way `ctr snapshots ls` does.

Grammar (containerd/filters):

    filters   := filter ( <several arguments: OR> )
    filter    := selector ( "," selector )*          comma = AND
    selector  := fieldpath [ op value ]              no op: the field is present and non-empty
    fieldpath := field ( "." field )*
    field     := identifier | quoted
    op        := "==" | "!=" | "~="                  ~= is a regular expression search
    value     := quoted | run of characters other than ","

Quoted strings use double quotes with Go/JSON-style backslash escapes; a value
may also be quoted with slashes (`/re/`) for regular expressions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from ..errors import InvalidInput

# Resolves a field path against an object: returns (value, present).
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_OPS = ("==", "!=", "~=")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "/": "/", "'": "'", "0": "\0"}


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    op: str | None = None
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, adapt: Adaptor) -> bool:
        value, present = adapt(self.fieldpath)
        if self.op is None:
            return present and value != ""
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return not present or value != self.value
        assert self.regex is not None
        return present and self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """One filter argument: all selectors must match (AND)."""

    selectors: tuple[Selector, ...]

    def match(self, adapt: Adaptor) -> bool:
        return all(s.match(adapt) for s in self.selectors)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> InvalidInput:
        return InvalidInput(f"invalid filter {self.text!r} at position {self.pos}: {msg}")

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def eof(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self) -> None:
        while not self.eof() and self.text[self.pos] in " \t":
            self.pos += 1

    def quoted(self, quote: str) -> str:
        assert self.text[self.pos] == quote
        self.pos += 1
        out: list[str] = []
        while True:
            if self.eof():
                raise self.error("unterminated quoted string")
            c = self.text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c == "\\":
                if self.eof():
                    raise self.error("unterminated escape")
                e = self.text[self.pos]
                self.pos += 1
                if quote == "/":
                    out.append("/" if e == "/" else "\\" + e)  # regex escapes pass through
                elif e in _ESCAPES:
                    out.append(_ESCAPES[e])
                elif e in "uxU":
                    width = {"x": 2, "u": 4, "U": 8}[e]
                    hexs = self.text[self.pos : self.pos + width]
                    if len(hexs) != width or not all(h in "0123456789abcdefABCDEF" for h in hexs):
                        raise self.error(f"bad \\{e} escape")
                    self.pos += width
                    out.append(chr(int(hexs, 16)))
                else:
                    raise self.error(f"unknown escape \\{e}")
            else:
                out.append(c)

    def field(self) -> str:
        self.skip_space()
        if self.peek() == '"':
            return self.quoted('"')
        m = re.compile(r"[A-Za-z0-9_\-/]+").match(self.text, self.pos)
        if not m:
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        self.skip_space()
        if self.peek() in ('"', "/"):
            v = self.quoted(self.peek())
            self.skip_space()
            return v
        start = self.pos
        while not self.eof() and self.text[self.pos] != ",":
            self.pos += 1
        v = self.text[start : self.pos].strip()
        if any(ch in v for ch in '"='):
            raise self.error("unquoted value contains '\"' or '='")
        return v


def parse_filter(text: str) -> Filter:
    """Parse one filter argument (selectors joined by commas)."""
    sc = _Scanner(text)
    selectors: list[Selector] = []
    while True:
        path = [sc.field()]
        while sc.peek() == ".":
            sc.pos += 1
            path.append(sc.field())
        sc.skip_space()
        op = sc.peek(2)
        if op in _OPS:
            sc.pos += 2
            value = sc.value()
            regex = None
            if op == "~=":
                try:
                    regex = re.compile(value)
                except re.error as e:
                    raise sc.error(f"bad regular expression: {e}") from None
            selectors.append(Selector(tuple(path), op, value, regex))
        elif sc.eof() or sc.peek() == ",":
            selectors.append(Selector(tuple(path)))
        else:
            raise sc.error(f"expected ',', '==', '!=' or '~=', got {sc.peek()!r}")
        sc.skip_space()
        if sc.eof():
            break
        if sc.peek() != ",":
            raise sc.error(f"expected ',', got {sc.peek()!r}")
        sc.pos += 1
    return Filter(tuple(selectors))


def parse_filters(texts: Iterable[str]) -> list[Filter]:
    """Parse several filter arguments; an item matches when any of them matches (OR)."""
    return [parse_filter(t) for t in texts if t.strip()]


def match_any(filters: Sequence[Filter], adapt: Adaptor) -> bool:
    return not filters or any(f.match(adapt) for f in filters)


def info_adaptor(fields: Mapping[str, str], labels: Mapping[str, str]) -> Adaptor:
    """Adaptor over containerd's snapshots.Info: name, kind, parent, labels.<key>."""

    def adapt(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "labels":
            key = ".".join(path[1:])
            if not key:
                return "", bool(labels)
            return (labels[key], True) if key in labels else ("", False)
        if len(path) == 1 and head in fields:
            return fields[head], True
        return "", False

    return adapt
