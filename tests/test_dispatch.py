"""Gateway discovery and selection, and the capacity formula, in memory."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from cachesvc.recache.dispatch import Gateway, GatewayPicker, gateways_from_registry
from cachesvc.recache.registry import Capacity, RenderService, healthy_services


def test_registry_entries_sorted_loopback_for_bare_ports_sharding_required() -> None:
    values = [
        json.dumps({"eg_id": "b", "address": ":10071", "sharding_enabled": True}).encode(),
        json.dumps({"eg_id": "a", "address": "10.0.0.5:10071", "sharding_enabled": True}).encode(),
        json.dumps({"eg_id": "c", "address": "10.0.0.6:10071", "sharding_enabled": False}).encode(),
        b"not json",
        json.dumps({"address": "x"}).encode(),
    ]
    assert gateways_from_registry(values) == [Gateway("a", "http://10.0.0.5:10071"), Gateway("b", "http://127.0.0.1:10071")]


def test_picker_round_robin_cooldown_and_static_fallback() -> None:
    clock = Clock()
    picker = GatewayPicker(["http://static:1/"], clock, cooldown=5)
    assert [picker.pick() for _ in range(2)] == [Gateway("http://static:1/", "http://static:1")] * 2
    a, b = Gateway("a", "http://a"), Gateway("b", "http://b")
    picker.update([a, b])
    assert [picker.pick().id for _ in range(4)] == ["a", "b", "a", "b"]  # type: ignore[union-attr]
    picker.rest(a)
    assert {picker.pick().id for _ in range(3)} == {"b"}  # type: ignore[union-attr]
    picker.rest(b)
    assert picker.pick() is None and picker.usable == []
    clock.advance(5.1)
    assert {g.id for g in picker.usable} == {"a", "b"}
    picker.update([])
    assert [g.id for g in picker.usable] == ["http://static:1/"]


def test_capacity_formula_matches_go() -> None:
    services = [RenderService("x", 100, 20, 0), RenderService("y", 50, 10, 0), RenderService("z", 30, 30, 0)]
    assert Capacity.of(services, 0.3) == Capacity(120, 36, 84, 0.3)
    assert Capacity.of([RenderService("x", 3, 0, 0)], 0.3) == Capacity(3, 0, 3, 0.3)  # Go truncates
    assert Capacity.of([], 0.3) == Capacity(0, 0, 0, 0.3)


def test_render_services_healthy_within_three_seconds() -> None:
    fresh = json.dumps({"id": "b", "capacity": 10, "load": 1, "last_seen": "2026-01-01T00:00:09.999999999Z"}).encode()
    stale = json.dumps({"id": "a", "capacity": 10, "load": 1, "last_seen": "2026-01-01T00:00:05Z"}).encode()
    now = 1767225610.0  # 2026-01-01T00:00:10Z
    assert [s.id for s in healthy_services([stale, fresh, b"{}", b"junk"], now)] == ["b"]
