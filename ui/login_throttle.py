"""Failed logins are throttled per client address: after `max_failures` wrong passwords within `window_s`,
that address gets 429 answers (with Retry-After) until the oldest failure leaves the window. Guessing
a password by brute force then takes years instead of seconds; a mistyped password costs nothing.

An ASGI middleware around Gradio's app, since Gradio's `/login` route itself has no hook for the client.
"""
from __future__ import annotations

import json
import math
import time
from collections import deque
from typing import Any, Callable

MAX_FAILURES = 5
WINDOW_S = 60.0
MAX_CLIENTS = 10_000  # addresses remembered at once; the oldest are forgotten first


class LoginThrottle:
    def __init__(self, app: Any, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self.app, self.max_failures, self.window_s, self.clock = app, max_failures, window_s, clock
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        failures = self._failures.get(client)
        if not failures:
            return 0.0
        now = self.clock()
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return 0.0
        return self.window_s - (now - failures[0]) if len(failures) >= self.max_failures else 0.0

    def failed(self, client: str) -> None:
        # Re-inserted last: dicts keep insertion order, so the first key is the client heard from longest ago.
        failures = self._failures[client] = self._failures.pop(client, None) or deque()
        failures.append(self.clock())
        while len(self._failures) > MAX_CLIENTS:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown",))[0]
        wait = self.retry_after(client)
        if wait > 0:
            seconds = math.ceil(wait)
            body = json.dumps({"detail": f"Too many failed logins from this address; try again in {seconds} s."})
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(seconds).encode())]})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        status: dict[str, int] = {}

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") == 400:  # Gradio's "Incorrect credentials."
            self.failed(client)
        elif status.get("code") == 200:
            self.succeeded(client)
