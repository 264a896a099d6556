# twistd -ny cachesvc.tac   (config file from $CACHESVC_CONFIG; defaults when unset)
import os
import sys

from twisted.application import service

from cachesvc import config
from cachesvc.service import makeService

try:
    _settings = config.resolve(os.environ.get("CACHESVC_CONFIG") or None)
except config.ConfigError as e:
    sys.exit(f"cachesvc: {e}")

application = service.Application("cachesvc")
makeService(_settings).setServiceParent(application)
