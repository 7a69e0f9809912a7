"""The process around the app: the waitress server, its workers and supervisor, the graceful
stop, and the memory manager."""
