"""Beside SQL: the HTTP server of a replica (health, metrics, status page) and alert delivery."""
