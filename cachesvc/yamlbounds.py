"""YAML whose reading is bounded by the file's size: PyYAML's safe loader, counting as it composes.

An alias (``*name``, ``<<: *name``) is composed as a reference to its anchor's node, so a "billion
laughs" document is a few hundred bytes and a few dozen nodes until something walks it, prints it
or checks every item of it. Counting each alias as the size of what it refers to, written out,
refuses a bomb before it is constructed. Nesting and integers are bounded too: 5,000 levels end in
a RecursionError, and ``int()`` of 5,000 digits in a ValueError, both tracebacks otherwise.

The parser is libyaml's where PyYAML has it (Go's yaml package is a port of libyaml, and it is three
times faster); composing, constructing and resolving are PyYAML's own, as in ``yaml.SafeLoader``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, Protocol, cast

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

MAX_ALIAS_NODES = 100_000
"""How many values YAML aliases (``*name``, ``<<: *name``) may add to one file, counted as written out."""

MAX_DEPTH = 100
"""How deeply collections may nest in a config file (real ones nest fewer than ten levels)."""

MAX_INT_CHARS = 100
"""The longest integer a config file may write (a 64-bit integer takes 20 characters, 66 in binary)."""


class Refused(yaml.YAMLError):
    """A bound was passed at *mark*; *problem* says which, and the fix."""

    def __init__(self, problem: str, mark: Mark) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


def load_bounded(raw: bytes, name: str) -> Any:
    """The one YAML document in *raw* (*name* is the file, for marks); raise :class:`Refused` past a bound."""
    loader = _Loader(raw, name)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _Bounded(Composer):
    """PyYAML's composer, counting what aliases add (each its anchor's node written out) and how deep it nests."""

    def _start_counting(self) -> None:
        self._sizes: dict[int, int] = {}  # id(node): how many nodes it stands for, written out
        self._aliased = 0
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        events = cast(Any, self)  # the parser's check_event and peek_event
        if events.check_event(yaml.AliasEvent):
            mark = events.peek_event().start_mark
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:  # its anchor is still open: the alias is inside what it names
                raise Refused("an alias refers to a collection that contains it; write the value out", mark)
            self._aliased += size
            if self._aliased > MAX_ALIAS_NODES:
                raise Refused(
                    f"aliases expand to more than {MAX_ALIAS_NODES:,} values, far beyond any real config "
                    "(an alias bomb?); write the values out or use fewer aliases",
                    mark,
                )
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = events.peek_event().start_mark
            raise Refused(f"nested more than {MAX_DEPTH} levels deep; no setting nests that deep", mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        size = 1
        if isinstance(node, SequenceNode):
            size += sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size += sum(self._sizes[id(key)] + self._sizes[id(value)] for key, value in node.value)
        self._sizes[id(node)] = size
        return node


def _bounded_int(loader: Any, node: ScalarNode) -> Any:
    text = str(node.value)
    if len(text) > MAX_INT_CHARS:  # int("9" * 5000) raises ValueError; "1:1:1:…" takes quadratic time
        raise Refused(
            f"an integer of {len(text):,} characters is too long (at most {MAX_INT_CHARS}); no setting needs one",
            node.start_mark,
        )
    return loader.construct_yaml_int(node)


class _PyLoader(_Bounded, yaml.SafeLoader):
    """The bounded loader in pure Python, where PyYAML was built without libyaml."""

    def __init__(self, raw: bytes, name: str) -> None:
        yaml.SafeLoader.__init__(self, raw)
        self.name = name  # marks name the file, not "<byte string>"
        self._start_counting()


_PyLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


class _Loading(Protocol):
    def get_single_data(self) -> Any: ...
    def dispose(self) -> None: ...


_Loader: Callable[[bytes, str], _Loading] = _PyLoader

try:
    from yaml._yaml import CParser
except ImportError:  # PyYAML built without libyaml
    pass
else:

    class _Named(io.BytesIO):
        def __init__(self, raw: bytes, name: str) -> None:
            super().__init__(raw)
            self.name = name  # libyaml's marks name the file

    class _CLoader(_Bounded, CParser, SafeConstructor, Resolver):
        """The bounded loader on libyaml's parser (Go's yaml package is a port of it), three times faster.

        Only the parser is libyaml's: composing (with the counting), constructing and resolving are
        PyYAML's own, as in ``yaml.SafeLoader``.
        """

        def __init__(self, raw: bytes, name: str) -> None:
            CParser.__init__(self, _Named(raw, name))
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            self._start_counting()

    _CLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)
    _Loader = _CLoader
