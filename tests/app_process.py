"""The real `python app.py` as a child process on a free loopback port, for tests that need the whole program."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_S = 180  # importing torch and gradio on a busy two-core CI machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(*args: str, env: dict[str, str] | None = None, preexec_fn=None):
    """Yields (url, process, output lines so far) once the app says it is running; kills it if still alive after.
    `preexec_fn` runs in the child before the app starts (e.g. to start it the way a background job would)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Prism is running"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(START_S), "app did not start:\n" + "".join(lines[-30:])
        yield f"http://127.0.0.1:{port}/", proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
