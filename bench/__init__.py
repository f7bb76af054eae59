"""fleetlog's benchmark suite: ``python -m bench [--quick]`` (see README.md)."""
