"""Failed logins are throttled per client address, with a fake clock (no waiting)."""
from __future__ import annotations

import asyncio

from ui.login_throttle import LoginThrottle


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def login(throttle: LoginThrottle, client: str, path: str = "/login") -> int:
    """POST `path` from `client` through the throttle to an app that accepts only client 'good'."""
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200 if scope["client"][0] == "good" else 400,
                    "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message):
        sent.append(message)

    throttle.app = app
    scope = {"type": "http", "method": "POST", "path": path, "client": (client, 5000)}
    asyncio.run(throttle(scope, None, send))
    return sent[0]["status"]


def test_failures_beyond_the_limit_are_refused_per_client_until_the_window_passes():
    clock = FakeClock()
    throttle = LoginThrottle(None, max_failures=3, window_s=60, clock=clock)
    assert [login(throttle, "10.0.0.1") for _ in range(5)] == [400, 400, 400, 429, 429]
    assert login(throttle, "10.0.0.2") == 400  # another address is not affected
    assert 59 < throttle.retry_after("10.0.0.1") <= 60
    clock.now += 61  # the failures age out
    assert login(throttle, "10.0.0.1") == 400


def test_a_success_clears_the_count_and_other_routes_pass_untouched():
    clock = FakeClock()
    throttle = LoginThrottle(None, max_failures=2, window_s=60, clock=clock)
    login(throttle, "good")
    assert throttle.retry_after("good") == 0
    throttle.failed("good")
    assert login(throttle, "good") == 200 and throttle.retry_after("good") == 0
    for _ in range(5):  # failures elsewhere (not /login) are not counted
        assert login(throttle, "10.0.0.3", path="/gradio_api/info") == 400
    assert throttle.retry_after("10.0.0.3") == 0
