"""Built artifacts (TensorRT plans, compiled PyTorch caches) on disk, one readable file per EngineKey.

Every artifact has a JSON manifest beside it (its key, size, checksum, build time). An artifact is
used only if the manifest exists, names the same key and format, and size and checksum match; anything
else is deleted and rebuilt, never trusted. Writes go to a temporary file that is renamed into place,
so a crash mid-build leaves nothing that looks valid. A per-key lock (threads and processes) makes
concurrent requests for one missing engine wait on a single build.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from .registry import REPO_ROOT

FORMAT_VERSION = 1  # bump when the manifest or artifact layout changes: old entries are then rebuilt
DEFAULT_CACHE_DIR = REPO_ROOT / "engine_cache"
ENV_VAR = "PRISM_ENGINE_CACHE"  # read once, by pipelines.config, as the --engine-cache default


@dataclass(frozen=True)
class EngineKey:
    """Everything that changes a built artifact. Change any field and you get another file."""

    model: str
    revision: str  # checkpoint revision, or "random-weights", or a content hash for local folders
    component: str
    precision: str
    recipe: str  # quantization recipe, e.g. "fp8-e4m3-max-calib64" ("none" for 16-bit)
    shapes: str  # image size range, e.g. "1024x1024" or "512-1344"
    batch: str  # batch range, e.g. "1-4"
    target: str  # GPU compute capability the artifact is built for, e.g. "sm121"
    backend: str  # "tensorrt", "tensorrt-rtx", "torch-inductor"
    backend_version: str

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def filename(self) -> str:
        parts = [self.model, self.component, f"{self.precision}-{self.recipe}", self.shapes, f"b{self.batch}",
                 self.target, f"{self.backend}-{self.backend_version}", self.digest()]
        return "__".join(re.sub(r"[^A-Za-z0-9.+-]+", "_", p) for p in parts)


@dataclass(frozen=True)
class Manifest:
    key: EngineKey
    size: int
    sha256: str
    build_seconds: float
    created: str
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "key": asdict(self.key)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        raw = json.loads(text)
        key_fields = {f.name for f in fields(EngineKey)}
        if set(raw.get("key", {})) != key_fields:
            raise ValueError("manifest key fields differ from this version's EngineKey")
        return cls(**{**raw, "key": EngineKey(**raw["key"])})


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    manifest: Manifest | None  # None when the manifest is missing or unreadable
    size: int
    last_used: float


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EngineCache:
    ARTIFACT_SUFFIX = ".engine"
    MANIFEST_SUFFIX = ".json"
    OWN_SUBDIRS = ("torch-inductor", "timing")  # folders the backends keep here (see engine_cache/README.md)

    def __init__(self, root: Path = DEFAULT_CACHE_DIR):
        self.root = Path(root).expanduser()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._verified: dict[Path, tuple[int, float]] = {}  # checksum checked once per process per file version

    def artifact_path(self, key: EngineKey) -> Path:
        return self.root / (key.filename() + self.ARTIFACT_SUFFIX)

    def manifest_path(self, key: EngineKey) -> Path:
        return self.root / (key.filename() + self.MANIFEST_SUFFIX)

    def lookup(self, key: EngineKey) -> Path | None:
        """The artifact for `key` if it is complete and untouched; otherwise remove whatever is there."""
        artifact, manifest_file = self.artifact_path(key), self.manifest_path(key)
        if not artifact.exists() and not manifest_file.exists():
            return None
        problem = self._problem(key, artifact, manifest_file)
        if problem is None:
            stat = artifact.stat()
            os.utime(artifact, ns=(time.time_ns(), stat.st_mtime_ns))  # access time = last use, for `prune`
            return artifact
        self._remove(key)
        return None

    def _problem(self, key: EngineKey, artifact: Path, manifest_file: Path) -> str | None:
        if not artifact.is_file() or not manifest_file.is_file():
            return "artifact or manifest missing"
        try:
            manifest = Manifest.from_json(manifest_file.read_text())
        except (ValueError, TypeError, KeyError):
            return "manifest unreadable"
        if manifest.format_version != FORMAT_VERSION or manifest.key != key:
            return "manifest from another version or key"
        stat = artifact.stat()
        if stat.st_size != manifest.size:
            return "size differs (truncated?)"
        if self._verified.get(artifact) != (stat.st_size, stat.st_mtime_ns):
            if _sha256(artifact) != manifest.sha256:
                return "checksum differs (corrupt)"
            self._verified[artifact] = (stat.st_size, stat.st_mtime_ns)
        return None

    def _remove(self, key: EngineKey) -> None:
        for p in (self.artifact_path(key), self.manifest_path(key)):
            p.unlink(missing_ok=True)
            self._verified.pop(p, None)

    @contextlib.contextmanager
    def _locked(self, key: EngineKey) -> Iterator[None]:
        name = key.filename()
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        self.root.mkdir(parents=True, exist_ok=True)
        with lock, open(self.root / (name + ".lock"), "w") as fd:
            fcntl.flock(fd, fcntl.LOCK_EX)  # other processes (the CLI building while the app runs)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def get_or_build(self, key: EngineKey, build: Callable[[Path], None]) -> Path:
        """The artifact for `key`, building it with `build(tmp_path)` if absent or invalid.

        `build` writes the artifact to the path it is given; it may also write files next to it whose
        names start with that path (e.g. a build log), which are renamed alongside.
        """
        found = self.lookup(key)
        if found:
            return found
        with self._locked(key):
            found = self.lookup(key)  # another thread or process may have built it while we waited
            if found:
                return found
            return self._build(key, build)

    def _build(self, key: EngineKey, build: Callable[[Path], None]) -> Path:
        final = self.artifact_path(key)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        started = time.monotonic()
        try:
            build(tmp)
            if not tmp.is_file():
                raise RuntimeError(f"The build for {key.component} produced no artifact.")
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            manifest = Manifest(key, tmp.stat().st_size, _sha256(tmp), round(time.monotonic() - started, 3),
                                datetime.now(timezone.utc).isoformat(timespec="seconds"))
            for extra in tmp.parent.glob(tmp.name + ".*"):  # side files such as the build log
                extra.replace(final.with_name(final.name + extra.name[len(tmp.name):]))
            tmp.replace(final)
            manifest_tmp = self.manifest_path(key).with_suffix(".json.tmp")
            manifest_tmp.write_text(manifest.to_json())
            manifest_tmp.replace(self.manifest_path(key))
        finally:
            tmp.unlink(missing_ok=True)
        return final

    # ---------------------------------------------------------------- management (CLI `cache`, System tab)

    def entries(self) -> list[CacheEntry]:
        if not self.root.is_dir():
            return []
        out = []
        for artifact in sorted(self.root.glob("*" + self.ARTIFACT_SUFFIX)):
            if artifact.is_symlink() or not artifact.is_file():  # not written by us: a link or a folder so named
                continue
            manifest_file = artifact.with_suffix(self.MANIFEST_SUFFIX)
            try:
                manifest = Manifest.from_json(manifest_file.read_text())
            except (OSError, ValueError, TypeError, KeyError):
                manifest = None
            stat = artifact.stat()
            size = stat.st_size + sum(p.stat().st_size for p in self.root.glob(artifact.name + ".*"))
            out.append(CacheEntry(artifact, manifest, size, stat.st_atime))
        return out

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def _delete(self, artifact: Path) -> None:
        for p in [artifact, artifact.with_suffix(self.MANIFEST_SUFFIX), *self.root.glob(artifact.name + ".*")]:
            p.unlink(missing_ok=True)

    def clear(self) -> int:
        """Remove what this cache wrote (artifacts with their manifests and side files, its temporary files,
        locks, timing caches and its own subfolders); returns the number of artifacts removed. Anything else
        in the folder (the README, someone's own files or folders, links) stays: the folder may be shared."""
        entries = self.entries()
        for e in entries:
            self._delete(e.path)
        if not self.root.is_dir():
            return len(entries)
        for pattern in (".*.tmp-*", "*.lock", "*.json.tmp", "timing-cache__*.bin"):
            for path in self.root.glob(pattern):
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
        for name in self.OWN_SUBDIRS:
            sub = self.root / name
            if sub.is_dir() and not sub.is_symlink():
                shutil.rmtree(sub, ignore_errors=True)
        return len(entries)

    def prune(self, max_bytes: int) -> list[Path]:
        """Delete least recently used artifacts until the cache holds at most `max_bytes`."""
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        removed = []
        for e in entries:
            if total <= max_bytes:
                break
            self._delete(e.path)
            total -= e.size
            removed.append(e.path)
        return removed
