"""The queue between gateways and workers: a Redis Stream, or the legacy list."""
