"""Who may call Prism's HTTP API (/v1/..., /metrics, /health): an optional Bearer key, and which web pages
a browser may call it from.

The check is a plain ASGI wrapper placed outside Gradio's own middleware. It has to be: Gradio answers CORS
preflights itself, and on a LAN address it approves every origin, so a page on the internet could make a
visitor's browser drive this GPU. Prism serves no page that calls its API, so every request a browser marks
with an Origin comes from some other page, and is refused (preflight or not) unless that origin was named
with --allow-origin. Not trusting an Origin that merely matches the Host header also defeats DNS
rebinding, where a hostile name is pointed at this machine to look same-origin. Clients that are not
browsers (curl, OpenAI's libraries) send no Origin. Standard library only, so `app.py` can check
--allow-origin before anything heavy is imported.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from .api_errors import ApiError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

OPEN_PATHS = ("/health",)  # no key needed: a container HEALTHCHECK or load balancer probes it, and it tells little
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_api_path(path: str) -> bool:
    return path in ("/health", "/metrics", "/v1") or path.startswith("/v1/")


def parse_origin(value: str) -> str:
    """`scheme://host[:port]` in canonical form, or ValueError saying what an origin looks like."""
    text = value.strip()
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in DEFAULT_PORTS or not parts.hostname or port == -1 or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username or parts.password):
        raise ValueError(f"--allow-origin takes an origin such as https://tools.example.com or "
                         f"http://192.168.1.30:8080 (scheme, host and optional port; no path); got {value!r}.")
    return _canonical(parts.scheme, parts.hostname, port)


def _canonical(scheme: str, host: str, port: int | None) -> str:
    host = host.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{scheme}://{host}" if port in (None, DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class ApiAccess:
    api_key: str | None = None
    login_required: bool = False  # the web UI asks for a login (--auth): the API must not be a way around it
    allowed_origins: tuple[str, ...] = ()  # canonical origins (parse_origin) whose pages may call the API

    @property
    def closed(self) -> bool:
        return self.login_required and not self.api_key

    def describe(self) -> str:
        """One startup line saying what the API needs."""
        if self.closed:
            return ("HTTP API (/v1, /metrics) closed: the app requires a login; add --api-key KEY (or set "
                    "PRISM_API_KEY) to open it to clients that send that key.")
        need = "a Bearer API key" if self.api_key else "no key: add --api-key KEY (or PRISM_API_KEY) to require one"
        return f"OpenAI-compatible images API at /v1 ({need}); /health and /metrics beside it."

    def refusal(self, path: str, headers: dict[str, str]) -> ApiError | None:
        """Why this request may not use the API, or None. Origins are checked by the middleware first."""
        if path in OPEN_PATHS:
            return None
        if self.closed:
            return ApiError(403, "The API is closed because this app requires a login (--auth) and no API key is set. "
                                 "Start Prism with --api-key KEY (or the PRISM_API_KEY environment variable) and send "
                                 "the key as 'Authorization: Bearer KEY'.", code="api_closed")
        if self.api_key is None:
            return None
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            what = "Incorrect" if given.strip() else "Missing"
            return ApiError(401, f"{what} API key: send the key Prism was started with (--api-key or PRISM_API_KEY) "
                                 "as 'Authorization: Bearer KEY'.", code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        return None


class ApiAccessMiddleware:
    """Wraps the whole app; acts on API paths only and passes everything else (the Gradio UI) through."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], access: ApiAccess):
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        cors: dict[str, str] = {}
        if origin is not None:
            try:
                canonical = parse_origin(origin)
            except ValueError:  # "null" (sandboxed frames, file: pages) or garbage: never allowed
                canonical = None
            if canonical not in self.access.allowed_origins:
                how = (f"If that page should use this API, start Prism with --allow-origin {canonical}." if canonical
                       else "Only pages at an http(s) origin named with --allow-origin may use it.")
                await _respond(send, ApiError(403, f"Requests from web pages at {origin[:200]} are refused. {how}",
                                              code="origin_not_allowed"))
                return
            cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                # OpenAI's JavaScript client sends its own x-stainless-* headers: the named origin may send any.
                requested = headers.get("access-control-request-headers", "authorization, content-type")
                await _respond(send, None, {**cors, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                            "Access-Control-Allow-Headers": requested, "Access-Control-Max-Age": "600"})
                return
        refusal = self.access.refusal(scope["path"], headers)
        if refusal is not None:
            await _respond(send, refusal, cors)
            return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", [])
                        if k.lower() not in (b"access-control-allow-origin", b"access-control-allow-credentials")]
                message = {**message, "headers": kept + [(k.lower().encode(), v.encode()) for k, v in cors.items()]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _respond(send: Send, error: ApiError | None, extra: dict[str, str] | None = None) -> None:
    """An error in OpenAI's JSON shape, or (error None) an empty 204 such as a preflight's answer."""
    body = error.json_bytes() if error else b""
    headers = {**(extra or {}), **(error.headers if error else {})}
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()] + [(b"content-length", str(len(body)).encode())]
    if error:
        raw.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": error.status if error else 204, "headers": raw})
    await send({"type": "http.response.body", "body": body})
