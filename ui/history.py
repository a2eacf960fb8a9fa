"""The session's results: every image a browser session made, newest first, with the settings that made it,
so any of them can be looked at again, downloaded, or have its settings or seed put back into the form.

On disk the same PNGs stay in the outputs folder (each with its settings in its metadata), the oldest batch
folders deleted once the folder holds more than its size cap.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_SESSION_ITEMS = 200  # per browser session; the oldest drop out of the gallery (their files stay on disk)
DEFAULT_OUTPUTS_MAX_BYTES = 2 * 1000**3
BATCH_NAME = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")  # the folders we create; anything else there is not ours


@dataclass(frozen=True)
class HistoryItem:
    path: str  # the PNG in the outputs folder
    seed: int
    settings: dict[str, Any] = field(hash=False)  # as in result_details: prompt, model (offered name), width, ...

    @property
    def caption(self) -> str:
        prompt = self.settings.get("prompt", "")
        return f"seed {self.seed} · {prompt[:40]}{'…' if len(prompt) > 40 else ''}"

    @property
    def image_for_input(self) -> str:
        """The file the input image takes when the user picks "Use as input"."""
        return self.path


def input_file(item: HistoryItem | None, what: str) -> str:
    """The picked history item's file, for "Use as input"; a one-line gr.Error when none is picked or its file
    has gone (the outputs folder deletes its oldest batches past its size cap)."""
    import gradio as gr

    if item is None:
        raise gr.Error(f"Click {what} in the history first.", print_exception=False)
    if not Path(item.image_for_input).is_file():
        raise gr.Error("That picture's file is no longer in the outputs folder (the oldest are deleted once it is "
                       "full); pick a newer one, or upload the picture.", print_exception=False)
    return item.image_for_input


def first_result(paths: list[str] | None, missing: str) -> str:
    """The first file of the last run's results, for "Use as input" / "Edit this picture"; `missing` (a one-line
    gr.Error) when the run made none."""
    import gradio as gr

    if not paths:
        raise gr.Error(missing, print_exception=False)
    return paths[0]


def add_results(history: list[HistoryItem], files: list[str] | None, details: dict | None) -> list[HistoryItem]:
    """`history` with one run's images added in front (newest first); unchanged when the run made none."""
    if not files or not details:
        return history
    settings = {k: v for k, v in details.items() if k not in ("timings", "files", "warnings", "peak_memory_bytes")}
    new = [HistoryItem(str(path), seed, settings) for path, seed in zip(files, details.get("seeds", []))]
    return (new[::-1] + list(history))[:MAX_SESSION_ITEMS]


def gallery_value(history: list[HistoryItem]) -> list[tuple[str, str]]:
    return [(item.path, item.caption) for item in history]


def prune_outputs(folder: Path, max_bytes: int, keep: int = 1) -> list[Path]:
    """Delete our oldest batch folders in `folder` until it holds at most `max_bytes` (the newest `keep` stay
    whatever their size). Returns the folders deleted."""
    if not folder.is_dir():
        return []
    batches = sorted((p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and BATCH_NAME.match(p.name)),
                     key=lambda p: p.name)  # names start with the creation time
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in batches}
    total = sum(sizes.values())
    removed = []
    for old in batches[:max(0, len(batches) - keep)]:
        if total <= max_bytes:
            break
        shutil.rmtree(old, ignore_errors=True)
        total -= sizes[old]
        removed.append(old)
    return removed
