"""fleetlog: collect, keep and read the logs of a fleet of devices."""

__version__ = "0.1.0"
