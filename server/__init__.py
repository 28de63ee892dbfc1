"""pigeon.server: the uvloop server (supervisor, workers, sessions, routing, store, auth, config)."""
