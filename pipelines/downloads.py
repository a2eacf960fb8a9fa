"""Fetching a component's files from the Hub before it loads, with byte progress and Stop.

`from_pretrained` downloads too, but silently (progress goes to a console bar nobody sees in the app) and
cannot be interrupted: a first FLUX.1-dev download is over 30 GB, so the browser would show "Loading" for many
minutes and Stop would wait for the end. Fetching the component's files first with huggingface_hub's
`snapshot_download` into the same cache lets each chunk report to the job and lets Stop abort between chunks;
`from_pretrained` then finds everything cached. Files already cached are not fetched again, and a partial
download resumes where it stopped.
"""
from __future__ import annotations

import time
from typing import Any

from .loading import WeightSource, translate_hub_errors
from .registry import ModelSpec
from .run_context import JobCancelled, RunContext

REPORT_EVERY_S = 0.5  # progress updates per second a browser can usefully show; chunks arrive far more often


def component_patterns(name: str) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for the files `from_pretrained` reads for component `name`: its configs,
    tokenizer files and safetensors weights, not the other formats (.bin, ONNX, Flax) or precision variants
    (`*.fp16.safetensors`) a repo may also hold, which would multiply the download (SDXL base's unet folder
    holds both a 10 GB fp32 and a 5 GB fp16 copy; Prism loads the default one)."""
    allow = [f"{name}/*.json", f"{name}/*.txt", f"{name}/*.model", f"{name}/*.safetensors"]
    ignore = [f"{name}/*.fp16.*", f"{name}/*.fp16-*", f"{name}/*.bf16.*", f"{name}/*.bf16-*"]
    return allow, ignore


def needs_download(spec: ModelSpec, source: WeightSource) -> bool:
    return not source.random_weights and spec.local_dir is None and spec.repo is not None and not source.hub.is_offline


def fetch_component(spec: ModelSpec, name: str, source: WeightSource, ctx: RunContext) -> None:
    """Bring component `name`'s files into the Hub cache, reporting bytes as stage "download"."""
    if not needs_download(spec, source):
        return
    from huggingface_hub import snapshot_download

    allow, ignore = component_patterns(name)
    with translate_hub_errors(spec, source.hub):
        snapshot_download(spec.repo, revision=spec.revision, token=source.hub.token, cache_dir=source.hub.cache_dir,
                          allow_patterns=allow, ignore_patterns=ignore,
                          tqdm_class=progress_bar_class(ctx, f"{spec.id} {name}"))


def progress_bar_class(ctx: RunContext, what: str) -> type:
    """A tqdm class for huggingface_hub to drive: its byte bars report to `ctx`, and every update checks Stop.

    huggingface_hub creates its bars from this class (a files bar and, in recent versions, aggregated byte
    bars) and updates them from its download threads; raising JobCancelled there ends the download, and
    snapshot_download passes the exception on to this job's thread. A real tqdm subclass (writing nowhere)
    keeps every method the Hub's versions may call.
    """
    from tqdm.auto import tqdm

    class JobProgress(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # only huggingface_hub's own tqdm takes it
            super().__init__(*args, **{**kwargs, "file": _Nowhere(), "disable": False})
            self._reported = 0.0

        def update(self, n: float | None = 1) -> bool | None:
            ctx.check_cancelled()
            shown = super().update(n)
            now = time.monotonic()
            if now - self._reported >= REPORT_EVERY_S or (self.total and self.n >= self.total):
                self._reported = now
                self._report()
            return shown

        def _report(self) -> None:
            if self.unit == "B":
                if self.total:  # byte bars start with total 0 and grow as files are announced
                    ctx.report("download", int(self.n), int(self.total),
                               f"downloading {what}: {_gb(self.n)} of {_gb(self.total)} GB")
            else:
                total = f" of {int(self.total)}" if self.total else ""
                ctx.report("download", int(self.n), int(self.total or 0), f"downloading {what}: {int(self.n)}{total} files")

    return JobProgress


class _Nowhere:
    """A file that drops what tqdm draws (the app shows progress in the browser instead)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}"
