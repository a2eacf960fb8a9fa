"""`python app.py`: arguments, the rules for exposing the app (LAN, share links, auth), and startup.

The arguments are checked before anything heavy is imported, so a refused `--share` answers at once.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipelines.config import add_runtime_args, manager_config
from pipelines.log_setup import configure_logging, drop_import_notices

log = logging.getLogger("prism.app")

DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 opens it to the network
DEFAULT_PORT = 7860


class LaunchError(ValueError):
    """An argument combination we refuse; the message says what to do instead."""


@dataclass(frozen=True)
class LaunchOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    share: bool = False
    auth: tuple[tuple[str, str], ...] = ()
    models: tuple[str, ...] = ()
    manager: Any = None  # pipelines.manager.ManagerConfig from the runtime flags (pipelines.config); None: defaults
    ray: str | None = None  # None: single process; "": the Ray cluster on this machine (or a new one); else its address
    verbose: bool = False
    output_dir: Path | None = None  # None: a temporary folder, removed at exit
    outputs_max_bytes: int = 2 * 1000**3
    api_key: str | None = None  # the HTTP API's Bearer key (--api-key or PRISM_API_KEY)
    allow_origins: tuple[str, ...] = ()  # web origins whose pages may call the HTTP API
    warm_up: tuple[str, ...] | None = None  # models to load and compile at start (); None: none
    extra: dict[str, Any] = field(default_factory=dict)  # passed to gr.Blocks.launch (tests)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description="Prism: Flux.1 and SDXL in the browser.")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: your network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (requires --auth or --auth-file)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                   help="require this login (repeatable)")
    p.add_argument("--auth-file", default=None, metavar="FILE", help="logins, one USER:PASSWORD per line")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models to offer: registry ids (flux.1-dev, flux.1-schnell, sdxl-base-1.0, sdxl-turbo, "
                        "demo-flux, demo-sdxl) or local folders in the Hugging Face layout (default: all known)")
    p.add_argument("--max-queue", type=int, default=4,
                   help="jobs that may wait for the GPU (default 4; 0: no waiting line, one job at a time)")
    p.add_argument("--output-dir", default=None, metavar="FOLDER",
                   help="keep every result here as PNGs with their settings (default: a temporary folder, removed "
                        "at exit)")
    p.add_argument("--outputs-max-size", default="2GB", metavar="SIZE",
                   help="size cap of the output folder, e.g. 2GB or 500MB; the oldest results are deleted beyond it")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this Bearer key on the OpenAI-compatible API (/v1/...) and /metrics; or set "
                        "PRISM_API_KEY, which other users of this machine cannot read from the process list. "
                        "With --auth and no key, the API is closed")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://tools.example.com) call the API from a browser "
                        "(repeatable; by default requests from web pages are refused)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="serve on a Ray cluster, one replica per GPU (pip install -r requirements-ray.txt): "
                        "ADDRESS joins a cluster (HOST:6379); without it, the one `ray start` made here, else a new one")
    p.add_argument("--warm-up", nargs="*", default=None, metavar="MODEL",
                   help="at start, load MODEL (default: the Flux tab's model; several may be named) and draw one "
                        "throwaway step at its default size and precision in the background, so the first image "
                        "skips loading and compiling; the page opens at once, and a job sent meanwhile waits for it")
    add_runtime_args(p)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_logins(values: Sequence[str], source: str) -> list[tuple[str, str]]:
    logins = []
    for value in values:
        user, sep, password = value.partition(":")
        if not sep or not user.strip() or not password:
            raise LaunchError(f"{source}: logins are USER:PASSWORD with both parts non-empty; got {value!r}.")
        logins.append((user.strip(), password))
    return logins


def read_auth_file(path: str) -> list[tuple[str, str]]:
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise LaunchError(f"--auth-file: cannot read {path} ({exc.strerror}).") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise LaunchError(f"--auth-file: {path} holds no USER:PASSWORD lines.")
    return parse_logins(lines, f"--auth-file {path}")


def options_from_args(argv: Sequence[str] | None = None) -> LaunchOptions:
    args = build_parser().parse_args(argv)
    logins = parse_logins(args.auth, "--auth")
    if args.auth_file:
        logins += read_auth_file(args.auth_file)
    if args.share and not logins:
        raise LaunchError("--share publishes this app on a public gradio.live link, which would hand this GPU to "
                          "anyone who finds it. Add --auth USER:PASSWORD (or --auth-file FILE) to use --share.")
    if not 0 < args.port < 65536:
        raise LaunchError(f"--port must be between 1 and 65535; got {args.port}.")
    if args.max_queue < 0:
        raise LaunchError("--max-queue must be 0 or more.")
    if args.ray is not None and args.max_queue < 1:
        raise LaunchError("--ray needs --max-queue 1 or more (Ray Serve's queue cannot be empty).")
    try:
        manager = manager_config(args, max_queue=args.max_queue)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    api_key, origins = api_settings(args)
    return LaunchOptions(host=args.host, port=args.port, share=args.share, auth=tuple(logins),
                         models=tuple(args.models or ()), manager=manager, verbose=args.verbose, api_key=api_key,
                         allow_origins=origins, ray=args.ray,
                         warm_up=None if args.warm_up is None else tuple(args.warm_up),
                         output_dir=Path(args.output_dir).expanduser() if args.output_dir else None,
                         outputs_max_bytes=parse_size("--outputs-max-size", args.outputs_max_size))


SIZE_UNITS = {"TB": 1000**4, "GB": 1000**3, "MB": 1000**2, "TIB": 1024**4, "GIB": 1024**3, "MIB": 1024**2}


def parse_size(flag: str, text: str) -> int:
    """'2GB', '500MB', '1.5GiB' -> bytes (a size on disk; no fractions of anything)."""
    raw = text.strip().upper().replace(" ", "")
    for unit, size in SIZE_UNITS.items():
        if raw.endswith(unit):
            try:
                value = float(raw[:-len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * size)
            break
    raise LaunchError(f"{flag}: write a size such as 2GB or 500MB; got {text!r}.")


def api_settings(args: argparse.Namespace) -> tuple[str | None, tuple[str, ...]]:
    """The HTTP API's key (the flag, else PRISM_API_KEY read now) and its allowed origins, checked."""
    from .api_access import parse_origin

    key = args.api_key if args.api_key is not None else os.environ.get("PRISM_API_KEY") or None
    if key is not None and not key.strip():
        raise LaunchError("--api-key must not be empty; leave it out to run the API without a key.")
    try:
        origins = tuple(dict.fromkeys(parse_origin(o) for o in args.allow_origin))
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    return key, origins


def lan_address() -> str | None:
    """This machine's address on its network, found without sending anything.

    `connect` on a UDP socket only picks the route and source address; no packet leaves. The target is a
    private-range address, so even the route lookup concerns the local network only.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))
            address = s.getsockname()[0]
        except OSError:
            address = None
    if address and not ipaddress.ip_address(address).is_loopback and address != "0.0.0.0":
        return address
    try:  # no route to a private range: fall back to what the host name resolves to locally
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_lines(opts: LaunchOptions, port: int, share_url: str | None) -> list[str]:
    lines = []
    if opts.host in ("0.0.0.0", "::"):
        lan = lan_address()
        lines.append(f"Prism is running on your network at http://{lan or '<this machine address>'}:{port} "
                     f"(on this machine: http://127.0.0.1:{port})")
        if lan is None:
            lines.append("(No network address found: is this machine connected?)")
    elif is_loopback(opts.host):
        lines.append(f"Prism is running at http://127.0.0.1:{port} (this machine only; use --host 0.0.0.0 "
                     "to reach it from your network)")
    else:
        lines.append(f"Prism is running at http://{opts.host}:{port}")
    if not is_loopback(opts.host) and not opts.auth:
        lines.append("Warning: anyone who can reach this address can use the GPU; add --auth USER:PASSWORD "
                     "to require a login.")
    if share_url:
        lines.append(f"Public link (login required): {share_url}")
    return lines


def start(opts: LaunchOptions, *, block: bool = True):
    """Build the manager, the service and the UI, and serve. Returns (demo, service) when `block` is False."""
    # Before gradio is imported: no telemetry or version check calls to api.gradio.app.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from pipelines.manager import ManagerConfig, PipelineManager
    from pipelines.request import RequestError

    from starlette.middleware import Middleware

    from .api import mount_api
    from .api_access import ApiAccess
    from .blocks import PRISM_CSS, create_demo
    from .login_throttle import LoginThrottle
    from .service import PrismService, offered_models

    config = opts.manager or ManagerConfig()
    models = offered_models(opts.models)  # before the manager: a bad --models answers at once
    if opts.ray is not None:  # Ray is imported only here: single-process mode runs without it
        from pipelines.serving.client import RayManager, ServingConfig

        manager = RayManager(config, ServingConfig(address=opts.ray or None, log_to_driver=opts.verbose))
    else:
        manager = PipelineManager(config)
    try:
        service = PrismService(manager, models, output_dir=opts.output_dir, hub=config.hub,
                               outputs_max_bytes=opts.outputs_max_bytes)
        if opts.warm_up is not None:  # before the page: loading overlaps gradio's start and the user's typing
            try:
                service.warm_up(opts.warm_up, log=lambda line: print(line, flush=True))
            except RequestError as exc:
                raise LaunchError(f"--warm-up: {exc}") from None
        demo = create_demo(service)
        app, _, share_url = demo.launch(
            server_name=opts.host, server_port=opts.port, share=opts.share, auth=list(opts.auth) or None,
            auth_message="Prism: log in to use this GPU." if opts.auth else None, prevent_thread_lock=True,
            quiet=True, show_error=False, ssr_mode=False, allowed_paths=[str(service.output_dir)],
            footer_links=["api", "settings"], css=PRISM_CSS, max_file_size=upload_cap_bytes(models),
            app_kwargs={"middleware": [Middleware(LoginThrottle)]} if opts.auth else None, **opts.extra)
        # The HTTP API (OpenAI-compatible images, /health, /metrics) on the same server: ui/api.py.
        api = ApiAccess(opts.api_key, login_required=bool(opts.auth), allowed_origins=opts.allow_origins)
        mount_api(app, service, api)
    except BaseException:
        manager.close()
        raise
    for line in startup_lines(opts, opts.port, share_url) + [api.describe()]:
        print(line, flush=True)
    if not block:
        return demo, service
    try:
        demo.block_thread()
    finally:
        demo.close()
        service.close()
        remove_gradio_copies(demo)
    return demo, service


def remove_gradio_copies(demo: Any) -> None:
    """Delete the copies of our results that Gradio cached to serve them (its shutdown hook does not always
    run), and the folders that held only them; other apps' files in Gradio's temporary folder stay."""
    for files in demo.temp_file_sets:
        for name in list(files):
            path = Path(name)
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: something else lives there
                path.parent.rmdir()


def upload_cap_bytes(models: Sequence[Any]) -> int:
    """The largest upload accepted: the largest image any offered model takes, as an uncompressed 8-bit RGBA
    PNG (the worst case for a real picture), plus 1 MiB for metadata. Anything bigger cannot be a valid input."""
    side = max((c.spec.size.max_side for c in models), default=2048)
    return side * side * 4 + 2**20


def _stop_like_ctrl_c(signum: int, frame: Any) -> None:
    # SIGTERM (docker stop, systemd, kill) takes Ctrl-C's path: the server closes, running jobs are
    # cancelled at their next step, and temporary folders are removed, instead of dying on the spot.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    drop_import_notices()
    try:
        opts = options_from_args(argv)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(opts.verbose)
    from pipelines.errors import user_message

    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    # SIGINT stops the app even where it was inherited as ignored: a background job of a non-interactive shell
    # (`cmd &` in a script, nohup'd CI) starts with SIGINT ignored, and Python then installs no Ctrl-C handler;
    # seen 2026-12-01: `kill -INT` left such an app serving until killed. Servers (uvicorn, gunicorn) do the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        start(opts)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # the port is taken, the address is not ours
        print(f"error: cannot serve on {opts.host}:{opts.port} ({exc}). Choose another --port or --host.",
              file=sys.stderr)
        return 2
    except Exception as exc:  # a bad --models, --memory-budget or --device: one line, no traceback
        if opts.verbose:
            log.exception("startup failed")
        print(f"error: {user_message(exc, fallback=False) or exc}", file=sys.stderr)
        return 2
    return 0
