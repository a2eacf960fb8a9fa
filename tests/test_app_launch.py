"""`python app.py`: what it binds to, when it refuses to start, how it prints its address, and that a
login is enforced when asked for."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app_process import running_app
from ui import launch
from ui.launch import LaunchError, LaunchOptions, options_from_args, startup_lines

REPO = Path(__file__).resolve().parent.parent


def run_app(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_defaults_are_this_machine_only():
    opts = options_from_args([])
    assert (opts.host, opts.port, opts.share, opts.auth) == ("127.0.0.1", 7860, False, ())


def test_share_without_auth_exits_with_a_clear_message():
    started = time.monotonic()
    done = run_app("--share")
    assert done.returncode == 2
    assert "--share" in done.stderr and "--auth USER:PASSWORD" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30  # refused before anything heavy is imported


def test_share_needs_a_login_from_auth_or_auth_file(tmp_path):
    with pytest.raises(LaunchError, match="--share"):
        options_from_args(["--share", "--host", "0.0.0.0"])
    assert options_from_args(["--share", "--auth", "me:pw:with:colons"]).auth == (("me", "pw:with:colons"),)
    logins = tmp_path / "logins"
    logins.write_text("# who may use the GPU\nalice:one\n\nbob:two\n")
    opts = options_from_args(["--share", "--auth-file", str(logins), "--auth", "carol:three"])
    assert opts.auth == (("carol", "three"), ("alice", "one"), ("bob", "two"))


@pytest.mark.parametrize("bad", ["nopassword", ":pw", "user:"])
def test_malformed_logins_are_refused(bad):
    with pytest.raises(LaunchError, match="USER:PASSWORD"):
        options_from_args(["--auth", bad])


def test_unreadable_or_empty_auth_file_is_refused(tmp_path):
    with pytest.raises(LaunchError, match="cannot read"):
        options_from_args(["--auth-file", str(tmp_path / "missing")])
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(LaunchError, match="no USER:PASSWORD"):
        options_from_args(["--auth-file", str(tmp_path / "empty")])


def test_lan_host_prints_the_lan_url_and_warns_without_a_login(monkeypatch):
    monkeypatch.setattr(launch, "lan_address", lambda: "192.168.1.20")
    lines = startup_lines(LaunchOptions(host="0.0.0.0"), 7860, None)
    assert "http://192.168.1.20:7860" in lines[0] and "http://127.0.0.1:7860" in lines[0]
    assert any("--auth" in line for line in lines)  # open to the network with no login: say so
    lines = startup_lines(LaunchOptions(host="0.0.0.0", auth=(("a", "b"),)), 7860, "https://x.gradio.live")
    assert not any(line.startswith("Warning") for line in lines) and "https://x.gradio.live" in lines[-1]
    assert "this machine only" in startup_lines(LaunchOptions(), 7860, None)[0]


def test_lan_address_is_a_real_non_loopback_address_or_none():
    address = launch.lan_address()  # routes only: nothing is sent
    if address is not None:
        socket.inet_aton(address)
        assert not address.startswith("127.")


def test_importing_the_app_loads_nothing_heavy():
    code = "import sys, app, ui, ui.launch; print(sorted(m for m in ('torch', 'gradio', 'diffusers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_bad_models_argument_is_one_line_and_exit_2(capsys, tmp_path):
    assert launch.main(["--models", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_auth_refuses_requests_without_credentials(tiny_flux):
    """The real command, with a login: no credentials or wrong ones get nothing; the right ones work."""
    import httpx
    from gradio_client import Client

    with running_app("--auth", "alice:s3cret", "--device", "cpu", "--models", str(tiny_flux)) as (url, proc, lines):
        assert url.rstrip("/") in "".join(lines)
        assert httpx.get(url + "gradio_api/info", timeout=10).status_code == 401
        join = httpx.post(url + "gradio_api/call/system_status", json={"data": []}, timeout=10)
        assert join.status_code == 401
        with pytest.raises(Exception, match="credentials were not provided"):
            Client(url, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("alice", "wrong"), verbose=False)
        overview = Client(url, auth=("alice", "s3cret"), verbose=False).predict(api_name="/system_status")[0]
        assert "Device" in overview
        proc.send_signal(signal.SIGINT)  # as Ctrl-C would: the app closes its server and manager
        proc.wait(30)
    assert proc.returncode == 0, "".join(lines[-20:])  # Ctrl-C is a clean stop, not a crash


def test_sigint_stops_the_app_even_when_started_with_sigint_ignored(tiny_flux):
    """A background job of a non-interactive shell (`bash scripts/run_app.sh &` in a script, a nohup'd CI run)
    starts with SIGINT ignored; `kill -INT` must still stop the app cleanly."""
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    with running_app("--device", "cpu", "--models", str(tiny_flux), preexec_fn=ignore_sigint) as (url, proc, lines):
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0, "".join(lines[-20:])


def test_output_folder_and_its_size_cap_are_options(tmp_path):
    opts = options_from_args(["--output-dir", str(tmp_path), "--outputs-max-size", "500MB"])
    assert opts.output_dir == tmp_path and opts.outputs_max_bytes == 500 * 1000**2
    assert options_from_args([]).outputs_max_bytes == 2 * 1000**3
    for bad in ("lots", "0GB", "-1GB", "0.5"):
        with pytest.raises(LaunchError, match="--outputs-max-size: write a size such as 2GB or 500MB"):
            options_from_args([f"--outputs-max-size={bad}"])


def test_upload_cap_fits_the_largest_input_image_of_the_offered_models():
    from ui.service import offered_models

    assert launch.upload_cap_bytes(offered_models(["demo-flux"])) == 128 * 128 * 4 + 2**20
    assert launch.upload_cap_bytes(offered_models()) == 2048 * 2048 * 4 + 2**20
