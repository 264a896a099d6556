"""Test and benchmark harness: real subprocesses and servers (twistd, redis-server, a fake Edge Gateway, FastCGI)."""
