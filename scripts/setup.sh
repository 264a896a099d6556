# Sourced by scripts/run.sh and scripts/test.sh: installs what is missing, nothing more.
#   - Debian packages the tests drive for real: redis-server, nginx, php-cli
#   - a virtualenv in .venv with cachesvc (editable, so twistd sees twisted/plugins) and its test tools
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_debian_packages() {
  local need=() cmd pkg
  for pair in "$@"; do
    cmd=${pair%%=*} pkg=${pair#*=}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  echo "setup: installing Debian packages: ${need[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
}

ensure_venv() {
  local stamp=.venv/.cachesvc-setup
  local want
  want=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
  if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing cachesvc and its dependencies into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >&2
    .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat >&2
    echo "$want" > "$stamp"
  fi
}
