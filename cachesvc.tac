# twistd -ny cachesvc.tac   (config file from $CACHESVC_CONFIG; defaults when unset)
# A configuration error prints one line and exits with status 78, as the plugin does. Console log
# lines go to twistd's standard output (run it with -n); logging.file writes a file of its own.
import os

from twisted.application import service

from cachesvc import config
from cachesvc.service import makeService
from cachesvc.tap import config_error

try:
    _settings = config.resolve(os.environ.get("CACHESVC_CONFIG") or None)
except config.ConfigError as e:
    config_error(e)

application = service.Application("cachesvc")
makeService(_settings).setServiceParent(application)
