"""Every case in ../shared/vectors/edgecomet-vectors.json, produced by running EdgeComet's Go logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachesvc.recache.gojson import GoJSONError, decode
from cachesvc.recache.members import encode_member
from cachesvc.recache.requests import BY_NAME
from cachesvc.recache.urlnorm import URLError, normalize, normalize_path, normalize_query, url_hash

VECTORS_FILE = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "edgecomet-vectors.json"
if not VECTORS_FILE.exists():  # a checkout elsewhere: the copy the suite ships
    VECTORS_FILE = Path(__file__).resolve().parent / "data" / "edgecomet-vectors.json"
VECTORS = json.loads(VECTORS_FILE.read_text())


def ids(cases: list[dict], key: str = "in") -> list[str]:
    return [repr(c.get(key, c.get("body", c.get("url_hex"))))[:60] for c in cases]


def normalized_or_none(url: str) -> str | None:
    try:
        return normalize(url)
    except URLError:
        return None


@pytest.mark.parametrize("case", VECTORS["urlnorm"], ids=ids(VECTORS["urlnorm"]))
def test_urlnorm(case: dict) -> None:
    assert normalized_or_none(case["in"]) == case["out"]


@pytest.mark.parametrize("case", VECTORS["urlnorm_version_dependent"], ids=ids(VECTORS["urlnorm_version_dependent"]))
def test_urlnorm_newest_go_1_24(case: dict) -> None:
    assert normalized_or_none(case["in"]) == case["expected_latest_go1.24"]


@pytest.mark.parametrize("case", VECTORS["xxh64"], ids=ids(VECTORS["xxh64"]))
def test_xxh64(case: dict) -> None:
    assert url_hash(case["in"]) == case["hex"]


@pytest.mark.parametrize("case", VECTORS["path_norm"], ids=ids(VECTORS["path_norm"]))
def test_path_norm(case: dict) -> None:
    assert normalize_path(case["in"].encode()).decode() == case["out"]


@pytest.mark.parametrize("case", VECTORS["query_norm"], ids=ids(VECTORS["query_norm"]))
def test_query_norm(case: dict) -> None:
    assert normalize_query(case["in"].encode()).decode() == case["out"]


@pytest.mark.parametrize("case", VECTORS["member"], ids=ids(VECTORS["member"], "url"))
def test_member_bytes(case: dict) -> None:
    assert encode_member(case["url"], case["dimension_id"]) == case["bytes"].encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("case", VECTORS["member_raw"], ids=ids(VECTORS["member_raw"], "url_hex"))
def test_member_bytes_from_invalid_utf8(case: dict) -> None:
    assert encode_member(bytes.fromhex(case["url_hex"]), case["dimension_id"]) == case["bytes"].encode()


@pytest.mark.parametrize(
    "case", VECTORS["member_version_dependent"], ids=ids(VECTORS["member_version_dependent"], "url")
)
def test_member_bytes_newest_go_1_24(case: dict) -> None:
    assert encode_member(case["url"], case["dimension_id"]) == case["expected_latest_go1.24"].encode()


@pytest.mark.parametrize("case", VECTORS["request_json"], ids=ids(VECTORS["request_json"], "body"))
def test_request_decoding(case: dict) -> None:
    body = bytes.fromhex(case["body_hex"]) if "body_hex" in case else case["body"].encode("utf-8", "surrogatepass")
    try:
        decoded, error = decode(body, BY_NAME[case["type"]]), None
    except GoJSONError as e:
        decoded, error = None, str(e)
    assert (decoded, error) == (case["decoded"], case["error"])


MEMBER_EDGE_CASES = [
    b'{"url":"a\\ud800","dimension_id":1}',
    b'{"url":"x","dimension_id":01}',
    b'{"url":"x","dimension_id":-0}',
    b'{"URL":"x","dimension_id":1}',
    b'{"url":"\\u00e9","dimension_id":99999999999999999999}',
    b'{"url":"x"}',
    b"not-valid-json",
    b'{"url":"a\\u0026b","dimension_id":2} ',
]


@pytest.mark.parametrize(
    "raw",
    [encode_member(c["url"], c["dimension_id"]) for c in VECTORS["member"]]
    + [encode_member(bytes.fromhex(c["url_hex"]), c["dimension_id"]) for c in VECTORS["member_raw"]]
    + MEMBER_EDGE_CASES,
)
def test_member_decoding_quick_path_agrees_with_go_semantics(raw: bytes) -> None:
    from cachesvc.recache.members import RECACHE_MEMBER, Member, decode_member

    def outcome(fn):  # type: ignore[no-untyped-def]
        try:
            return fn()
        except GoJSONError as e:
            return ("error", str(e))

    full = outcome(lambda: Member(**decode(raw, RECACHE_MEMBER)))
    assert outcome(lambda: decode_member(raw)) == full
