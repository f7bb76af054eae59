"""The device-facing WebSocket gateway."""
