"""The request bodies of the Cache Daemon API, as the Go structs that decode them."""

from __future__ import annotations

from cachesvc.recache.gojson import Field, Struct
from cachesvc.recache.members import RECACHE_MEMBER

RECACHE_REQUEST = Struct(
    "RecacheAPIRequest",
    (Field("host_id", "int"), Field("urls", "[]string"), Field("dimension_ids", "[]int"), Field("priority", "string")),
)
INVALIDATE_REQUEST = Struct(
    "InvalidateAPIRequest", (Field("host_id", "int"), Field("urls", "[]string"), Field("dimension_ids", "[]int"))
)
INVALIDATE_ALL_REQUEST = Struct("InvalidateAllAPIRequest", (Field("host_id", "int"), Field("dimension_ids", "[]int")))

BY_NAME = {s.go_name: s for s in (RECACHE_REQUEST, INVALIDATE_REQUEST, INVALIDATE_ALL_REQUEST, RECACHE_MEMBER)}
