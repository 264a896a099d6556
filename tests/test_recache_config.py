"""cache-daemon.yaml and the EG config: documented defaults when omitted, Go's checks when given."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachesvc import config
from cachesvc.recache.edgeconfig import EdgeConfigError, load_edge_config
from cachesvc.recache.settings import go_listen_endpoint

HOST = "hosts:\n  - id: {id}\n    domain: {domain}\n"


def eg(tmp_path: Path, include: str = "hosts.d", extra: str = "") -> Path:
    path = tmp_path / "edge-gateway.yaml"
    path.write_text(f"internal: {{auth_key: k}}\nhosts: {{include: {include}}}\n{extra}")
    return path


def hosts(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / "hosts.d").mkdir(exist_ok=True)
    (tmp_path / "hosts.d" / name).write_text(text)


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    hosts(tmp_path, "a.yaml", HOST.format(id=1, domain="a.example"))
    eg(tmp_path)
    conf = tmp_path / "cd.yaml"
    conf.write_text("eg_config: edge-gateway.yaml\ndaemon_id: d\nredis: {addr: 'localhost:6379'}\n")
    s = config.resolve(str(conf)).recache
    assert (s.tick_interval, s.normal_check_interval, s.max_size, s.max_retries, s.retry_base_delay) == (
        1.0, 60.0, 1000, 3, 5.0
    )
    assert (s.rs_capacity_reserved, s.timeout_per_url, s.api_enabled, s.api_listen, s.request_timeout) == (
        0.30, 60.0, True, "tcp:10090", 30.0
    )
    assert (s.metrics_path, s.metrics_namespace, s.high_queue_limit, s.normal_check_ticks) == (
        "/metrics", "edgecomet", 1000, 60
    )


def test_go_marshalled_file_with_zero_values(tmp_path: Path) -> None:
    """yaml.Marshal of Go's config writes every field, zeros included: that file must load."""
    hosts(tmp_path, "a.yaml", HOST.format(id=1, domain="a.example"))
    eg(tmp_path)
    conf = tmp_path / "cd.yaml"
    conf.write_text(f"""eg_config: {tmp_path}/edge-gateway.yaml
daemon_id: test-daemon
redis: {{addr: 127.0.0.1:1, password: "", db: 0}}
scheduler: {{tick_interval: 100ms, normal_check_interval: 0s}}
internal_queue: {{max_size: 1000, max_retries: 3, retry_base_delay: 100ms}}
recache: {{rs_capacity_reserved: 0.3, timeout_per_url: 1m0s}}
http_api: {{enabled: true, listen: ":1234", request_timeout: 30s, scheduler_control_api: true}}
logging:
  level: info
  console: {{enabled: true, format: json, level: ""}}
  file: {{enabled: false, path: "", format: "", level: "",
          rotation: {{max_size: 0, max_age: 0, max_backups: 0, compress: false}}}}
metrics: {{enabled: false, listen: "", path: "", namespace: ""}}
""")
    s = config.resolve(str(conf)).recache
    assert (s.tick_interval, s.normal_check_ticks, s.timeout_per_url, s.retry_base_delay) == (0.1, 1, 60.0, 0.1)


def test_durations_as_go_nanoseconds_and_days(tmp_path: Path) -> None:
    hosts(tmp_path, "a.yaml", HOST.format(id=1, domain="a.example"))
    eg(tmp_path)
    conf = tmp_path / "cd.yaml"
    conf.write_text("eg_config: edge-gateway.yaml\ndaemon_id: d\nredis: {addr: 'x:1'}\n"
                    "scheduler: {tick_interval: 500000000}\nrecache: {timeout_per_url: 1.5d}\n")
    s = config.resolve(str(conf)).recache
    assert (s.tick_interval, s.timeout_per_url) == (0.5, 129600.0)


@pytest.mark.parametrize(
    "listen, endpoint",
    [(":10090", "tcp:10090"), ("127.0.0.1:10090", "tcp:10090:interface=127.0.0.1"), ("10090", "tcp:10090"),
     ("[::1]:8080", "tcp:8080:interface=::1"), ("unix:/run/cd.sock", "unix:/run/cd.sock")],
)
def test_listen_forms(listen: str, endpoint: str) -> None:
    assert go_listen_endpoint(listen) == endpoint


@pytest.mark.parametrize("listen", [":0", ":70000", "host:", "nonsense"])
def test_bad_listen(listen: str) -> None:
    with pytest.raises(ValueError, match="valid port"):
        go_listen_endpoint(listen)


def test_hosts_from_a_directory_sorted_by_name_with_bypass_injected(tmp_path: Path) -> None:
    hosts(tmp_path, "20-b.yaml", HOST.format(id=2, domain="b.example"))
    hosts(tmp_path, "10-a.yaml", "hosts:\n  - id: 7\n    domain: [a.example., www.a.example]\n"
          "    dimensions:\n      desktop: {id: 1}\n      bots: {id: 5, action: block, match_ua: ['*Bot*']}\n"
          "    render: {cache: {expired: {stale_ttl: 2m}}}\n")
    hosts(tmp_path, "notes.txt", "not yaml hosts")
    edge = load_edge_config(str(eg(tmp_path, extra="render: {cache: {expired: {stale_ttl: 60s}}}\n"
                                    "dimensions: {mobile: {id: 3}}\n")))
    assert [h.id for h in edge.hosts] == [7, 2]
    a, b = edge.hosts
    assert a.domains == ("a.example", "www.a.example") and a.domain == "a.example"
    assert [(d.name, d.id, d.action) for d in a.dimensions] == [
        ("desktop", 1, "render"),
        ("bots", 5, "block"),
        ("bypass", 0, "bypass"),
    ]
    assert a.recache_dimension_ids == [0, 1] and a.stale_ttl == 120
    assert [d.name for d in b.dimensions] == ["mobile", "bypass"]  # the global dimensions
    assert b.stale_ttl == 60  # and the global stale_ttl
    assert edge.auth_key == "k"


def test_hosts_from_a_file_and_a_glob(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text(HOST.format(id=1, domain="one.example"))
    assert [h.id for h in load_edge_config(str(eg(tmp_path, include="one.yaml"))).hosts] == [1]
    hosts(tmp_path, "x-1.yaml", HOST.format(id=3, domain="x.example"))
    hosts(tmp_path, "y-1.yaml", HOST.format(id=4, domain="y.example"))
    assert [h.id for h in load_edge_config(str(eg(tmp_path, include="'hosts.d/x-*.yaml'"))).hosts] == [3]


@pytest.mark.parametrize(
    "files, fragments",
    [
        (
            {"a.yaml": HOST.format(id=1, domain="a"), "b.yaml": HOST.format(id=1, domain="b")},
            ["b.yaml", "a.yaml", "unique"],
        ),
        ({"a.yaml": "hosts:\n  - id: 0\n    domain: a\n"}, ["a.yaml", "hosts[0].id", "positive"]),
        ({"a.yaml": "hosts:\n  - id: 1\n"}, ["a.yaml", "hosts[0].domain", "required"]),
        (
            {"a.yaml": "hosts:\n  - id: 1\n    domain: a\n    dimensions: {d: {id: 1}, e: {id: 1}}\n"},
            ["dimensions.e.id 1", "already used"],
        ),
        (
            {"a.yaml": "hosts:\n  - id: 1\n    domain: a\n    dimensions: {d: {id: 0}}\n"},
            ["dimensions.d.id 0", "reserved"],
        ),
        (
            {"a.yaml": "hosts:\n  - id: 1\n    domain: a\n    dimensions: {d: {id: 2, action: block}}\n"},
            ["dimensions.d", "match_ua"],
        ),
        (
            {"a.yaml": "hosts:\n  - id: 1\n    domain: a\n    dimensions: {d: {id: 2, action: bypass}}\n"},
            ["dimensions.d.action", "bypass"],
        ),
        ({}, ["matches no host files"]),
    ],
)
def test_eg_config_refusals_name_file_and_key(tmp_path: Path, files: dict[str, str], fragments: list[str]) -> None:
    (tmp_path / "hosts.d").mkdir()
    for name, text in files.items():
        hosts(tmp_path, name, text)
    with pytest.raises(EdgeConfigError) as e:
        load_edge_config(str(eg(tmp_path)))
    for fragment in fragments:
        assert fragment in str(e.value)


def test_missing_auth_key(tmp_path: Path) -> None:
    path = tmp_path / "eg.yaml"
    path.write_text("internal: {listen: ':1'}\nhosts: {include: x}\n")
    with pytest.raises(EdgeConfigError, match="internal.auth_key in EG config is required"):
        load_edge_config(str(path))
