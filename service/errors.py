"""The one error a handler raises: an HTTP status and a one-line message."""

from __future__ import annotations


class ApiError(Exception):
    """Answered as ``{"error": message}`` with ``status`` (always a 4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())
