"""Stage 1: the HTTP endpoints that take events in."""
