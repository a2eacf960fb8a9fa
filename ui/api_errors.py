"""HTTP API errors in the shape OpenAI's clients parse: {"error": {"message", "type", "param", "code"}}.

Standard library only: the access layer (api_access.py) answers with these before anything heavy loads.
"""
from __future__ import annotations

import json
from typing import Any


def error_type(status: int) -> str:
    """OpenAI's `type` for a status: what its client libraries and most tools switch on."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


class ApiError(Exception):
    """A refusal with its status; the message says what to change, and never names a server path."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        if status >= 500 and status not in (502, 504):
            # Retrying cannot help (the model cannot load, the feature is missing): tell OpenAI's clients,
            # which otherwise retry every 5xx twice, to stop.
            self.headers.setdefault("x-should-retry", "false")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": error_type(self.status), "param": self.param,
                          "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()
