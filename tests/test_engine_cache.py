"""The engine cache trusts nothing it cannot verify, writes atomically, and builds each engine once."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipelines.engine_cache import EngineCache, EngineKey, Manifest

ROOT = Path(__file__).resolve().parent.parent

KEY = EngineKey(model="flux.1-dev", revision="abc123", component="transformer", precision="fp8",
                recipe="fp8-e4m3-max-calib32", shapes="1024x1024", batch="1-1", target="sm121",
                backend="tensorrt", backend_version="10.13.0")


def writer(payload: bytes, calls: list | None = None, delay: float = 0.0):
    def build(path: Path) -> None:
        if calls is not None:
            calls.append(path)
        time.sleep(delay)
        path.write_bytes(payload)
        Path(str(path) + ".buildlog.txt").write_text("layer precisions: FP8")

    return build


def test_every_key_field_changes_the_file_name():
    names = {KEY.filename()}
    for f in dataclasses.fields(EngineKey):
        changed = dataclasses.replace(KEY, **{f.name: getattr(KEY, f.name) + "x"})
        names.add(changed.filename())
    assert len(names) == 1 + len(dataclasses.fields(EngineKey))
    assert KEY.filename().startswith("flux.1-dev__transformer__fp8-fp8-e4m3-max-calib32__1024x1024__b1-1__sm121")


def test_build_then_find_with_manifest_and_side_files(tmp_path):
    cache = EngineCache(tmp_path)
    calls = []
    path = cache.get_or_build(KEY, writer(b"engine-bytes", calls))
    assert path.read_bytes() == b"engine-bytes" and len(calls) == 1
    manifest = Manifest.from_json(cache.manifest_path(KEY).read_text())
    assert manifest.key == KEY and manifest.size == len(b"engine-bytes") and len(manifest.sha256) == 64
    assert Path(str(path) + ".buildlog.txt").read_text() == "layer precisions: FP8"
    assert cache.get_or_build(KEY, writer(b"other", calls)) == path and len(calls) == 1  # found, not rebuilt
    assert [e.manifest.key for e in cache.entries()] == [KEY]


@pytest.mark.parametrize("damage", ["truncate", "flip", "other_version", "other_key", "no_manifest", "garbage_manifest"])
def test_damaged_artifacts_are_rebuilt_never_loaded(tmp_path, damage):
    cache = EngineCache(tmp_path)
    path = cache.get_or_build(KEY, writer(b"A" * 4096))
    manifest_path = cache.manifest_path(KEY)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(path.read_bytes())
        data[2000] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "other_version":
        raw = json.loads(manifest_path.read_text())
        raw["format_version"] = 0
        manifest_path.write_text(json.dumps(raw))
    elif damage == "other_key":
        raw = json.loads(manifest_path.read_text())
        raw["key"]["backend_version"] = "10.8.0"
        manifest_path.write_text(json.dumps(raw))
    elif damage == "no_manifest":
        manifest_path.unlink()
    else:
        manifest_path.write_text("{not json")
    fresh = EngineCache(tmp_path)  # a new process: no memory of earlier checks
    assert fresh.lookup(KEY) is None
    calls = []
    rebuilt = fresh.get_or_build(KEY, writer(b"B" * 4096, calls))
    assert len(calls) == 1 and rebuilt.read_bytes() == b"B" * 4096


def test_a_failed_build_leaves_nothing_that_loads(tmp_path):
    cache = EngineCache(tmp_path)

    def crash(path: Path) -> None:
        path.write_bytes(b"half an eng")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        cache.get_or_build(KEY, crash)
    assert cache.lookup(KEY) is None
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".engine", ".json")]


def test_a_build_killed_mid_write_leaves_no_file_that_loads(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from pipelines.engine_cache import EngineCache, EngineKey
        key = EngineKey(**{dataclasses.asdict(KEY)!r})
        def build(path):
            with open(path, "wb") as f:
                f.write(b"x" * 1000); f.flush()
                print("writing", flush=True)
                time.sleep(60)
        EngineCache(Path({str(tmp_path)!r})).get_or_build(key, build)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    cache = EngineCache(tmp_path)
    assert cache.lookup(KEY) is None
    calls = []
    assert cache.get_or_build(KEY, writer(b"good", calls)).read_bytes() == b"good" and len(calls) == 1
    assert [e.path for e in cache.entries()] == [cache.artifact_path(KEY)]  # the dead build's temp file is no entry


def test_concurrent_requests_for_one_missing_engine_build_it_once(tmp_path):
    cache = EngineCache(tmp_path)
    calls, results = [], []
    start = threading.Barrier(4)

    def request():
        start.wait()
        results.append(cache.get_or_build(KEY, writer(b"once", calls, delay=0.3)))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(results) == 4 and len(set(results)) == 1


def test_two_processes_build_once(tmp_path):
    counter = tmp_path / "builds.txt"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from pipelines.engine_cache import EngineCache, EngineKey
        key = EngineKey(**{dataclasses.asdict(KEY)!r})
        def build(path):
            with open({str(counter)!r}, "a") as f:
                f.write("build\\n")
            time.sleep(1.0)
            path.write_bytes(b"engine")
        EngineCache(Path({str(tmp_path / "cache")!r})).get_or_build(key, build)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert counter.read_text().count("build") == 1


def test_prune_removes_least_recently_used_first_and_clear_empties(tmp_path):
    cache = EngineCache(tmp_path)
    keys = [dataclasses.replace(KEY, shapes=f"{s}x{s}") for s in (512, 768, 1024)]
    for i, k in enumerate(keys):
        cache.get_or_build(k, writer(bytes(1000)))
        os.utime(cache.artifact_path(k), (1_000_000 + i, 1_000_000 + i))
    cache.lookup(keys[0])  # used just now: newest
    removed = cache.prune(max_bytes=2 * 1000 + 2 * len("layer precisions: FP8"))
    assert removed == [cache.artifact_path(keys[1])]
    assert cache.lookup(keys[0]) and cache.lookup(keys[2]) and cache.lookup(keys[1]) is None
    assert cache.clear() == 2 and cache.entries() == []


def test_clear_removes_only_what_the_cache_wrote(tmp_path):
    cache = EngineCache(tmp_path)
    cache.get_or_build(KEY, writer(bytes(100)))
    (tmp_path / "torch-inductor" / "fxgraph").mkdir(parents=True)  # the PyTorch backend's own folder
    (tmp_path / "torch-inductor" / "fxgraph" / "x.bin").write_bytes(b"k")
    (tmp_path / "timing-cache__trt-10__sm90.bin").write_bytes(b"t")
    foreign = tmp_path / "my-other-data"  # someone keeps their files here: not ours to delete
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "README.md").write_text("readme")
    assert cache.clear() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "my-other-data"]
    assert (foreign / "notes.txt").read_text() == "mine"


def test_links_and_folders_named_like_engines_are_neither_listed_nor_break_clear(tmp_path):
    cache = EngineCache(tmp_path)
    cache.get_or_build(KEY, writer(bytes(100)))
    (tmp_path / "gone.engine").symlink_to(tmp_path / "nowhere")  # dangling
    (tmp_path / "folder.engine").mkdir()
    (tmp_path / "folder.engine" / "keep.txt").write_text("x")
    assert [e.path.name for e in cache.entries()] == [cache.artifact_path(KEY).name]
    assert cache.total_bytes() > 0
    assert cache.clear() == 1
    assert (tmp_path / "gone.engine").is_symlink() and (tmp_path / "folder.engine" / "keep.txt").exists()
    assert cache.entries() == []
