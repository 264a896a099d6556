#!/usr/bin/env bash
# Sets up and runs cachesvc in the foreground on its defaults (purge service on 127.0.0.1:7836,
# cache root /cache). Extra arguments go to the cachesvc plugin (e.g. --config cachesvc.yaml).
source "$(dirname "$0")/setup.sh"
ensure_venv
if [ $# -eq 0 ] && [ ! -d /cache ]; then
  echo "run: creating the default cache root /cache" >&2
  as_root mkdir -p /cache
fi
exec .venv/bin/twistd -n --pidfile= cachesvc "$@"
