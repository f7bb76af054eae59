"""fleetlog's HTTP API: operator auth, commands down to devices, health and metrics."""
