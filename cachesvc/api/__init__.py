"""The Cache Daemon HTTP API (twisted.web), wire-compatible with EdgeComet's."""
