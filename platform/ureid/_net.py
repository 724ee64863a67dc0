"""One TCP probe for the addresses a job is given (a Ray head, an MLflow server): their clients retry a dead
address for minutes before they say so, and one connection says it in seconds."""

from __future__ import annotations

import socket


def tcp_refusal(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout`` seconds, else why not, in the
    system's words (e.g. "Connection refused")."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)
