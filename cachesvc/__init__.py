"""cachesvc: keeps web page caches fresh, as Twisted services run by twistd."""
