"""`python app.py`: arguments, the rules for exposing the app (LAN, share links, auth), and startup.

The arguments are checked before anything heavy is imported, so a refused `--share` answers at once.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
    memory_budget: str | None = None
    backend: str = "auto"
    models: tuple[str, ...] = ()
    device: str = "auto"
    offline: bool = False
    max_queue: int = 4
    compile: bool = False
    random_weights: bool = False
    ray: str | None = None  # None: single process; "": the Ray cluster on this machine (or a new one); else its address
    verbose: bool = False
    output_dir: Path | None = None
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
    p.add_argument("--memory-budget", default=None, help="memory Prism may use, e.g. 40GB or 0.6 of the device")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "torch"],
                   help="auto picks TensorRT where it is installed and runs on this GPU, else PyTorch")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models to offer: registry ids (flux.1-dev, flux.1-schnell, sdxl-base-1.0, sdxl-turbo, "
                        "demo-flux, demo-sdxl) or local folders in the Hugging Face layout (default: all known)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub")
    p.add_argument("--max-queue", type=int, default=4, help="jobs that may wait for the GPU (default 4)")
    p.add_argument("--compile", action="store_true",
                   help="PyTorch backend: torch.compile the denoiser (GPU; the first image per precision and size "
                        "takes minutes, later ones are up to 1.7x faster)")
    p.add_argument("--random-weights", action="store_true",
                   help="Hub models get their exact architecture with random weights (try the app on a GPU without "
                        "downloading; pictures are noise)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="serve on a Ray cluster, one replica per GPU (pip install -r requirements-ray.txt): "
                        "ADDRESS joins a cluster (HOST:6379); without it, the one `ray start` made here, else a new one")
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
    return LaunchOptions(host=args.host, port=args.port, share=args.share, auth=tuple(logins),
                         memory_budget=args.memory_budget, backend=args.backend, models=tuple(args.models or ()),
                         device=args.device, offline=args.offline, max_queue=args.max_queue, compile=args.compile,
                         random_weights=args.random_weights, ray=args.ray, verbose=args.verbose)


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
    from pipelines.loading import HubOptions
    from pipelines.manager import ManagerConfig, PipelineManager

    from .blocks import create_demo
    from .service import PrismService, offered_models

    hub = HubOptions(offline=True if opts.offline else None)
    models = offered_models(opts.models)  # before the manager: a bad --models answers at once
    config = ManagerConfig(device=opts.device, backend=opts.backend, memory_budget=opts.memory_budget, hub=hub,
                           max_queue=opts.max_queue, compile=opts.compile, random_weights=opts.random_weights)
    if opts.ray is not None:  # Ray is imported only here: single-process mode runs without it
        from pipelines.serving.client import RayManager, ServingConfig

        manager = RayManager(config, ServingConfig(address=opts.ray or None, log_to_driver=opts.verbose))
    else:
        manager = PipelineManager(config)
    try:
        service = PrismService(manager, models, output_dir=opts.output_dir, hub=hub)
        demo = create_demo(service)
        _, _, share_url = demo.launch(
            server_name=opts.host, server_port=opts.port, share=opts.share, auth=list(opts.auth) or None,
            auth_message="Prism: log in to use this GPU." if opts.auth else None, prevent_thread_lock=True,
            quiet=True, show_error=False, ssr_mode=False, allowed_paths=[str(service.output_dir)],
            footer_links=["api", "settings"], **opts.extra)
    except BaseException:
        manager.close()
        raise
    for line in startup_lines(opts, opts.port, share_url):
        print(line, flush=True)
    if not block:
        return demo, service
    try:
        demo.block_thread()
    finally:
        demo.close()
        service.close()
    return demo, service


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = options_from_args(argv)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pipelines.errors import user_message

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
