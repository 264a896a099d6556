# Sourced by scripts/run.sh and scripts/test.sh: installs what is missing, nothing more.
#   - Debian packages the tests drive for real: redis-server, nginx, php-cli; for WordPress: wordpress,
#     php-fpm, php-mysql, mariadb-server; systemd (systemd-socket-activate, systemd-analyze) for the units
#   - a virtualenv in .venv with cachesvc (editable, so twistd sees twisted/plugins) and its test tools
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Each argument is CHECK=PACKAGES: CHECK is a command (on PATH or in /usr/sbin) or, when it starts with
# /, a path pattern some file must match; PACKAGES (comma-separated) are installed when it is missing.
ensure_debian_packages() {
  local need=() check pkgs extra
  for pair in "$@"; do
    check=${pair%%=*} pkgs=${pair#*=}
    if [[ $check == /* ]]; then
      compgen -G "$check" >/dev/null && continue
    else
      { command -v "$check" >/dev/null 2>&1 || [ -x "/usr/sbin/$check" ]; } && continue
    fi
    IFS=, read -ra extra <<< "$pkgs"
    need+=("${extra[@]}")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  echo "setup: installing Debian packages: ${need[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
}

# What the WordPress end-to-end tests drive (harness/wordpress.py runs this too when something is missing):
# Debian's wordpress, php-fpm with php-mysql, and mariadb-server (the tests start their own mariadbd).
# php comes with wordpress so that apt meets wordpress's "libapache2-mod-php | php" with php-fpm, not Apache.
ensure_wordpress_packages() {
  ensure_debian_packages php=php-cli nginx=nginx-light mariadbd=mariadb-server mariadb-install-db=mariadb-server \
    '/usr/sbin/php-fpm*=php-fpm' '/etc/php/*/mods-available/mysqli.ini=php-mysql' \
    /usr/share/wordpress/wp-settings.php=wordpress,php,php-fpm,php-mysql
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
