#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k purge -x).
source "$(dirname "$0")/setup.sh"
ensure_debian_packages redis-server=redis-server nginx=nginx-light php=php-cli
ensure_venv
exec .venv/bin/python -m pytest "$@"
