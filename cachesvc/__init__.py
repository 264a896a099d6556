"""cachesvc: keeps web page caches fresh, as Twisted services run by twistd."""

__version__ = "0.1.0"
