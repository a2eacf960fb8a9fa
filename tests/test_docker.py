"""What can be checked about the Docker image without Docker: the files it copies exist, the flags it passes
are ones app.py accepts, it installs the same requirement files as scripts/setup.sh and none of them pins
torch (which would replace the NVIDIA container's build), it runs as a user other than root, it has a
HEALTHCHECK on /health, its caches are volumes, no token is baked in, and hadolint finds nothing."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ui.launch import build_parser, options_from_args

REPO = Path(__file__).resolve().parent.parent


def instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def words(args: str) -> list[str]:
    """An instruction's arguments: its JSON (exec) form, or shell words."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def requirement_files(name: str, seen: set[str] | None = None) -> set[str]:
    """`name` and every file it includes with -r."""
    seen = set() if seen is None else seen
    seen.add(name)
    for line in (REPO / name).read_text().splitlines():
        match = re.match(r"\s*-r\s+(\S+)", line)
        if match and match.group(1) not in seen:
            requirement_files(match.group(1), seen)
    return seen


def setup_options() -> list[str]:
    """The options the image passes to scripts/setup.sh (it must install through the same script)."""
    for keyword, args in instructions():
        if keyword == "RUN" and "scripts/setup.sh" in args:
            command = args.split("&&")[0].split()
            return command[command.index("scripts/setup.sh") + 1:]
    raise AssertionError("the Dockerfile does not install through scripts/setup.sh")


def test_every_copy_source_exists():
    copies = [words(args) for keyword, args in instructions() if keyword in ("COPY", "ADD")]
    assert copies
    for copy in copies:
        assert not any(w.startswith("--from") for w in copy), "a multi-stage COPY needs its own check"
        sources = [w for w in copy[:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"


def test_entrypoint_and_cmd_flags_are_accepted_by_app_py():
    found = {keyword: words(args) for keyword, args in instructions() if keyword in ("ENTRYPOINT", "CMD")}
    command = found.get("ENTRYPOINT", []) + found.get("CMD", [])
    assert "app.py" in command
    flags = command[command.index("app.py") + 1:]
    assert "--host" in flags  # inside a container the app must listen beyond loopback
    build_parser().parse_args(flags)  # exits (SystemExit) on an unknown flag
    options_from_args(flags)  # and the combination passes app.py's own checks


def test_image_installs_the_setup_scripts_requirement_files_with_no_torch_pin():
    options = setup_options()
    setup = (REPO / "scripts/setup.sh").read_text()
    for option in options:
        assert re.search(rf"^\s*{re.escape(option)}\)", setup, re.M), f"setup.sh has no option {option}"
    files = set()
    for name in re.findall(r"-r (requirements[\w.-]*\.txt)", setup):
        if name == "requirements-test.txt" and "--test" not in options:
            continue
        if name == "requirements-tensorrt.txt" and "--tensorrt" not in options:
            continue
        files |= requirement_files(name)
    assert "requirements.txt" in files
    for name in files:
        for line in (REPO / name).read_text().splitlines():
            requirement = line.split("#")[0].strip()
            package = re.match(r"[A-Za-z0-9._-]*", requirement).group(0).lower().replace("_", "-")
            assert package not in ("torch", "torchvision", "torchaudio"), f"{name} pins {requirement!r}"
    # Nothing else is installed on the side: the setup script is the one way in.
    for keyword, args in instructions():
        if keyword == "RUN":
            assert "pip install" not in args, f"the Dockerfile installs packages itself: {args}"


def test_runs_as_a_user_other_than_root():
    users = [args.split(":")[0] for keyword, args in instructions() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    order = [keyword for keyword, _ in instructions()]
    assert max(i for i, k in enumerate(order) if k == "USER") < order.index("ENTRYPOINT")


def test_healthcheck_probes_health():
    checks = [args for keyword, args in instructions() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and "/health" in checks[0] and "CMD" in checks[0]


def test_caches_are_volumes_and_no_token_is_baked_in():
    env = {}
    for keyword, args in instructions():
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    volumes = [v for keyword, args in instructions() if keyword == "VOLUME" for v in words(args)]
    assert env["HF_HOME"] in volumes and env["PRISM_ENGINE_CACHE"] in volumes
    for keyword, args in instructions():
        if keyword in ("ENV", "ARG", "LABEL"):
            assert "HF_TOKEN" not in args and "PRISM_API_KEY" not in args, f"{keyword} {args}"


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint is missing: pip install -r requirements-test.txt"
    done = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

