"""The recache half: an EdgeComet-compatible Cache Daemon (config, data model, API, scheduler)."""
