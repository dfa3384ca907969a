"""The WebSocket bridge for browsers (a gRPC client of the service). Not built yet: see the issues."""
