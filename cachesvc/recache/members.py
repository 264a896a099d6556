"""Recache queue members: the JSON bytes Go writes for ``RecacheMember{URL, DimensionID}``.

The member string is the entry's identity in the sorted set, so it must be byte-identical to what
Go components write. A member read from Redis is decoded leniently but never re-serialised: when
an entry goes back to a queue, the exact bytes that came out go back in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from cachesvc.recache.gojson import Field, Struct, decode, encode_string

RECACHE_MEMBER = Struct("RecacheMember", (Field("url", "string"), Field("dimension_id", "int")))


@dataclass(frozen=True)
class Member:
    url: str
    dimension_id: int


def encode_member(url: str | bytes, dimension_id: int) -> bytes:
    return b'{"url":' + encode_string(url) + b',"dimension_id":' + str(dimension_id).encode() + b"}"


_CANONICAL = re.compile(rb'\{"url":("(?:[^"\\\x00-\x1f]|\\["\\/bfnrtu])*"),"dimension_id":(-?[1-9][0-9]{0,17}|0)\}\Z')


def decode_member(raw: bytes) -> Member:
    """Raise ``GoJSONError`` for a member Go could not decode either."""
    canonical = _CANONICAL.match(raw)
    if canonical is not None and raw.isascii():  # what Go and cachesvc write: the quick way
        url = json.loads(canonical.group(1))
        if not any("\ud800" <= ch <= "\udfff" for ch in url):
            return Member(url, int(canonical.group(2)))
    fields = decode(raw, RECACHE_MEMBER)
    return Member(fields["url"], fields["dimension_id"])
