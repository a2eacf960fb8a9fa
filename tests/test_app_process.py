"""The real `python app.py` process with the embedded demo models on the CPU, on 127.0.0.1 only: signals during
a job, hostile and malformed requests, uploads and logins, seen from outside as a client and an operator would."""
from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app_process import running_app


@contextmanager
def app_process(tmp_path: Path, *args: str):
    """The app on the demo models, its temporary files kept under `tmp_path/tmp`; yields (url, proc, lines)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio"), "PRISM_ENGINE_CACHE": str(tmp_path / "engine-cache")}
    with running_app("--device", "cpu", "--offline", "--models", "demo-flux", "demo-sdxl", *args, env=env) as app:
        yield app


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_job_stops_it_exits_0_and_leaves_no_temporary_files(tmp_path, signum):
    from gradio_client import Client

    with app_process(tmp_path) as (url, proc, lines):
        client = Client(url, verbose=False)
        client.predict(model="demo-flux", prompt="a large red circle in the center on a white background", steps=1,
                       api_name="/generate_flux")  # results and Gradio's cache copies now exist on disk
        assert files_under(tmp_path / "tmp")
        job = client.submit(model="demo-flux", prompt="a small blue star at the top on a white background",
                            width=128, height=128, steps=100, num_images=8, api_name="/generate_flux")
        seen = ""
        deadline = time.monotonic() + 120
        while "Denoising" not in seen and time.monotonic() < deadline:
            seen = " ".join(unit.desc or "" for unit in (job.status().progress_data or []))
            time.sleep(0.05)
        assert "Denoising: step" in seen and "step 100/100" not in seen, seen  # the job is mid-way
        proc.send_signal(signum)
        assert proc.wait(30) == 0, "".join(lines[-20:])
    log = "".join(lines)
    assert "Traceback" not in log and "terminate called" not in log, log[-3000:]
    assert files_under(tmp_path / "tmp") == []


def _call(url: str, api_name: str, data: list | bytes, cookies: httpx.Cookies) -> tuple[str, str]:
    """(event, data) of a named endpoint's final answer, through Gradio's plain HTTP API."""
    body = data if isinstance(data, bytes) else json.dumps({"data": data}).encode()
    posted = httpx.post(f"{url}gradio_api/call/{api_name}", content=body, cookies=cookies, timeout=30,
                        headers={"content-type": "application/json"})
    assert posted.status_code == 200, posted.text
    event_id = posted.json()["event_id"]
    event = ""
    with httpx.stream("GET", f"{url}gradio_api/call/{api_name}/{event_id}", cookies=cookies, timeout=120) as reply:
        for line in reply.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, line[len("data: "):]
    raise AssertionError(f"no final event from {api_name}")


def test_hostile_requests_get_one_line_answers_and_logins_are_throttled(tmp_path):
    with app_process(tmp_path, "--auth", "alice:s3cret", "--max-queue", "0") as (url, proc, lines):
        login = httpx.post(f"{url}login", data={"username": "alice", "password": "s3cret"}, timeout=10)
        assert login.status_code == 200
        cookies = login.cookies

        # 10: a 10 MB prompt is refused before any work, with the cap in the message.
        event, data = _call(url, "generate_flux", ["demo-flux", "x" * 10_000_000], cookies)
        assert event == "error" and "10,000,000 characters long; the limit is 4,000 characters" in data
        # 14: text where a number goes, a fraction for a whole number, a lone surrogate, too few values.
        event, data = _call(url, "generate_flux", ["demo-flux", "a red circle", "abc"], cookies)
        assert event == "error" and "width must be a whole number; got 'abc'." in data
        event, data = _call(url, "generate_flux", ["demo-flux", "a red circle", 64, 64, 20, 0, 1.5], cookies)
        assert event == "error" and "seed must be a whole number; got 1.5." in data
        surrogate = b'{"data": ["demo-flux", "a \\ud800 circle", 64, 64, 1]}'
        event, data = _call(url, "generate_flux", surrogate, cookies)
        assert event == "error" and "invalid character at position 3" in data
        event, data = _call(url, "compare", ["demo-flux", "a \ud800"[:2] + "b", 1, []], cookies)
        assert event == "error" and "Select at least one precision" in data
        event, data = _call(url, "generate_sdxl", ["demo-sdxl", "a", "", 64, 64, 1, 4, 1, 1, "bf16", "", None, 0.6, 4,
                                                   False, "", 1, "", 1, False, False, 0.8, "extra"], cookies)
        assert event == "error" and "sent 23 values; it takes at most 22: model, prompt, negative_prompt, width" in data
        event, data = _call(url, "generate_sdxl", ["demo-sdxl", "a", "", 64, 64, 1, 4, 1, 1, "bf16", "", None, 0.6, 4,
                                                   False, "", 1, "", 1, "extra"], cookies)  # the "cached" checkbox
        assert event == "error" and "cache must be one of off, fast (or true / false); got 'extra'." in data
        event, data = _call(url, "generate_sdxl", [], cookies)  # everything left to its default: the prompt is empty
        assert event == "error" and "Type a prompt first" in data
        # null is "the default": every optional parameter may be left out or sent as null.
        event, data = _call(url, "generate_sdxl", ["demo-sdxl", "a large green square in the center on a white "
                                                   "background", None, None, None, 1], cookies)
        assert event == "complete" and json.loads(data)[4]["width"] == 64

        # 15: an upload larger than the largest input image any offered model takes (128 px here) is refused.
        big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"\0" * (2 * 2**20))},
                         cookies=cookies, timeout=30)
        assert big.status_code == 413, big.text
        small = httpx.post(f"{url}gradio_api/upload", files={"files": ("small.png", b"\0" * 1000)}, cookies=cookies,
                           timeout=30)
        assert small.status_code == 200, small.text

        # 16: repeated wrong passwords from one client are throttled, the right one included, until the window passes.
        codes = [httpx.post(f"{url}login", data={"username": "alice", "password": f"guess{i}"}, timeout=10).status_code
                 for i in range(30)]
        assert codes[:5] == [400] * 5 and set(codes[5:]) == {429}
        throttled = httpx.post(f"{url}login", data={"username": "alice", "password": "s3cret"}, timeout=10)
        assert throttled.status_code == 429 and "Too many failed logins" in throttled.text
        assert 0 < int(throttled.headers["retry-after"]) <= 60

        log = "".join(lines)
        assert "Traceback" not in log, log[-3000:]
        refused = [line for line in lines if "refused" in line]
        assert len(refused) >= 6 and all(len(line) < 400 for line in refused)  # one short line each
        assert httpx.get(url, cookies=cookies, timeout=10).status_code == 200  # still serving
