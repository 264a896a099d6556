#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then the lint and type gates
# (ruff check, mypy --strict; configured in pyproject.toml), then pytest. Any failure fails the script.
# Extra arguments go to pytest (e.g. scripts/test.sh -k purge -x).
source "$(dirname "$0")/setup.sh"
ensure_debian_packages redis-server=redis-server nginx=nginx-light php=php-cli systemd-socket-activate=systemd systemd-analyze=systemd promtool=prometheus
ensure_wordpress_packages
ensure_venv
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
