"""The System tab: device and memory, the backend in use and why, resident models, the engine cache."""
from __future__ import annotations

import threading
from typing import Any

import gradio as gr

from .errors import ui_error
from .formatting import fmt_bytes, short_dtype
from .generate_tab import run_once
from .inputs import FreeChoice
from pipelines.backends.torch_backend import lever_states
from pipelines.request import RequestError

from .service import PrismService

RESIDENT_HEADERS = ["Model", "Component", "Form", "Backend", "Memory", "Where"]
CACHE_HEADERS = ["Model", "Component", "Precision", "Shapes", "Batch", "Target", "Backend", "Size", "File"]


def system_snapshot(service: PrismService) -> dict[str, Any]:
    """Everything the tab shows, as plain data (also the `system_status` API's JSON)."""
    status = service.status()
    memory = service.memory()
    info = status.device
    models: dict[str, int] = {}
    for r in status.resident:
        models[r.key.model] = models.get(r.key.model, 0) + r.nbytes
    cache = []
    for e in service.manager.engine_cache.entries():
        k = e.manifest.key if e.manifest else None
        cache.append({"file": e.path.name, "size_bytes": e.size, "valid_manifest": k is not None,
                      **({"model": k.model, "component": k.component, "precision": f"{k.precision}/{k.recipe}",
                          "shapes": k.shapes, "batch": k.batch, "target": k.target,
                          "backend": f"{k.backend} {k.backend_version}"} if k else {})})
    running = status.running
    replicas = getattr(status, "replicas", None)  # Ray Serve mode: one row per replica (its GPU, models, health)
    return {
        "device": {"name": info.name, "device": info.device, "compute_capability": info.capability_text,
                   "unified_memory": info.unified},
        "memory": {"used_bytes": memory.used_bytes, "total_bytes": memory.total_bytes, "kind": memory.kind},
        "budget_bytes": status.budget_bytes, "resident_bytes": status.used_bytes, "parked_bytes": status.parked_bytes,
        "backend": {"configured": service.manager.config.backend, "in_use": status.backend_note,
                    "tensorrt": status.tensorrt.reason, "tensorrt_can_run": status.tensorrt.can_run},
        # each PyTorch speed lever as started (--compile-vae, --no-fused-qkv, ...) and whether it acts here
        "speed_levers": lever_states(service.manager.config.torch, info.is_cuda),
        "prompt_cache": prompt_cache_state(service.manager),
        "resident_models": models,
        "resident": [{"model": r.key.model, "component": r.key.name, "form": r.key.variant, "backend": r.key.backend,
                      "bytes": r.nbytes, "parked": r.parked}
                     for r in status.resident if r.nbytes],  # tokenizers and schedulers hold no memory
        "engine_cache": {"dir": str(status.engine_cache_dir), "total_bytes": status.engine_cache_bytes,
                         "entries": cache},
        "jobs": {"running": None if running is None else {"model": service.running_name() or "", "precision": str(
            getattr(running.precision, "value", running.precision))}, "queued": status.queued},
        "events": list(status.events),
        **({"replicas": status.replica_rows(), "deployment": status.deployment} if replicas is not None else {}),
    }


def prompt_cache_state(manager: Any) -> str:
    """Whether repeated prompts skip the text encoders, and how many were kept and reused so far."""
    entries = manager.config.prompt_cache_entries
    if not entries:
        return "off (--no-prompt-cache)"
    cache = getattr(manager, "prompts", None)  # under Ray Serve each replica keeps its own
    if cache is None:
        return f"on, up to {entries} prompts in each replica"
    return f"on: {len(cache)} of up to {entries} prompts kept, {cache.hits} reused"


def self_check_markdown(report: Any, checks: list[Any]) -> str:
    """The doctor's rows as a table (while running: the rows so far), then the machine's facts."""
    lines = ["**Self-check " + ("running...** rows appear as they finish." if report is None else
                                ("done: no failures.**" if report.ok else "done: SOME CHECKS FAILED.**")),
             "", "| Backend | Precision | Result | Rel. error | Time | Detail |", "| --- | --- | --- | ---: | ---: | --- |"]
    for c in checks:
        error = "-" if c.rel_error is None else f"{c.rel_error:.4f}"
        lines.append(f"| {c.backend} | {c.precision} | {c.status} | {error} | {c.seconds:.1f} s | {c.detail} |")
    if report is not None:
        lines += ["", "| Fact | Value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in report.facts.items()]
    return "\n".join(lines)


def system_markdown(snap: dict[str, Any]) -> str:
    d, m, b = snap["device"], snap["memory"], snap["backend"]
    if d["device"] == "cpu":
        device_line = f"**Device:** {d['name']} (no CUDA GPU found: running on the CPU)"
    else:
        device_line = f"**GPU:** {d['name']} · compute capability {d['compute_capability']}"
    resident = ", ".join(f"{name} {fmt_bytes(n)}" for name, n in snap["resident_models"].items()) or "none"
    running = snap["jobs"]["running"]
    lines = [
        "### Device", device_line,
        f"**Memory:** {fmt_bytes(m['used_bytes'])} of {fmt_bytes(m['total_bytes'])} used ({m['kind']})",
        f"**Prism's memory budget:** {fmt_bytes(snap['budget_bytes'])} · in use by resident models "
        f"{fmt_bytes(snap['resident_bytes'])}" + (f" (+ {fmt_bytes(snap['parked_bytes'])} parked in host RAM)"
                                                    if snap["parked_bytes"] else ""),
        f"**Jobs:** {'running ' + running['model'] + ' ' + running['precision'] if running else 'none running'}"
        f" · {snap['jobs']['queued']} waiting",
        "### Backend",
        f"**In use:** {b['in_use']}",
        *([] if b["tensorrt"] in b["in_use"] else [f"**TensorRT:** {b['tensorrt']}"]),  # said once, not twice
        f"**Requested:** `--backend {b['configured']}`",
        *(["**PyTorch speed levers:** " + " · ".join(f"{name}: {state}"
                                                    for name, state in snap["speed_levers"].items())]
          if snap.get("speed_levers") else []),
        *([f"**Prompt cache:** {snap['prompt_cache']}"] if snap.get("prompt_cache") else []),
        "### Resident models", resident,
        "### Engine cache",
        f"{len(snap['engine_cache']['entries'])} engine(s), {fmt_bytes(snap['engine_cache']['total_bytes'])} in "
        f"`{snap['engine_cache']['dir']}`",
    ]
    if "replicas" in snap:
        lines += ["### Replicas", f"Ray Serve deployment: {snap['deployment']}"] + [
            f"**{r['replica']}** on {r['node']} · {r['device']} ({r['device_id']}) · "
            f"{fmt_bytes(r['memory_used_bytes'])} of {fmt_bytes(r['memory_total_bytes'])} · models: "
            f"{', '.join(r['resident_models']) or 'none'} · {'running ' + r['running'] if r['running'] else 'idle'}"
            f" · {r['queued']} waiting · {r['health']}" for r in snap["replicas"]]
    return "\n\n".join(lines)


def resident_rows(snap: dict[str, Any]) -> list[list[str]]:
    on_gpu = snap["device"]["device"] != "cpu"
    here = "GPU memory" if on_gpu else "system RAM"
    return [[r["model"], r["component"], short_dtype(r["form"]), r["backend"], fmt_bytes(r["bytes"]),
             "host RAM (parked)" if r["parked"] else here] for r in snap["resident"]]


def cache_rows(snap: dict[str, Any]) -> list[list[str]]:
    rows = []
    for e in snap["engine_cache"]["entries"]:
        if e["valid_manifest"]:
            rows.append([e["model"], e["component"], e["precision"], e["shapes"], e["batch"], e["target"],
                         e["backend"], fmt_bytes(e["size_bytes"]), e["file"]])
        else:
            rows.append(["(no valid manifest: rebuilt on use)", "", "", "", "", "", "", fmt_bytes(e["size_bytes"]),
                         e["file"]])
    return rows


def build_system_tab(service: PrismService) -> tuple[Any, list[Any]]:
    """Widgets and events; returns (refresh handler, its outputs) so the app can refresh when the tab opens."""
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="system-refresh", scale=0)
    overview = gr.Markdown("", label="Overview", elem_id="system-overview")
    resident = gr.Dataframe(headers=RESIDENT_HEADERS, label="Resident components", interactive=False,
                            elem_id="system-resident", column_count=len(RESIDENT_HEADERS))
    with gr.Row():
        # Typed `str` in the API (the resident models change as jobs run); unknown names are refused by `unload_model`.
        to_unload = FreeChoice([], value=None, label="Model to unload", elem_id="system-unload-model", scale=2,
                                allow_custom_value=True)
        unload = gr.Button("Unload model", elem_id="system-unload", scale=1)
        unload_all = gr.Button("Unload all models", elem_id="system-unload-all", scale=1)
    cache = gr.Dataframe(headers=CACHE_HEADERS, label="Engine cache", interactive=False, elem_id="system-cache",
                         column_count=len(CACHE_HEADERS))
    clear = gr.Button("Clear engine cache", variant="stop", elem_id="system-clear-cache")
    message = gr.Markdown("", label="Message", elem_id="system-message")
    check = gr.Button("Self-check: what works on this machine (about 2 minutes)", elem_id="system-self-check")
    check_report = gr.Markdown("", label="Self-check", elem_id="system-self-check-report")
    check_file = gr.File(label="Self-check report (JSON, for bug reports)", visible=False,
                         elem_id="system-self-check-file")
    with gr.Accordion("Status (JSON)", open=False):
        raw = gr.JSON(label="System status", elem_id="system-json")

    view_outputs = [overview, resident, to_unload, cache, raw]

    def view(note: str = "") -> tuple:
        snap = system_snapshot(service)
        models = list(snap["resident_models"])
        return (system_markdown(snap), resident_rows(snap), gr.update(choices=models, value=models[0] if models else None),
                cache_rows(snap), snap, note)

    def status() -> tuple:
        return view()

    def unload_model(model: str | None) -> tuple:
        name = model
        if not name:
            return view("Choose a resident model to unload.")
        resident = list(system_snapshot(service)["resident_models"])
        if name not in resident:
            raise RequestError(f"{name} is not loaded; loaded now: {', '.join(resident) or 'none'}.")
        freed = service.unload(name)
        return view(f"Unloaded {name}: {fmt_bytes(freed)} released.")

    def unload_everything() -> tuple:
        freed = service.unload(None)
        return view(f"Unloaded every model: {fmt_bytes(freed)} released.")

    def clear_cache() -> tuple:
        removed, freed = service.clear_engine_cache()
        return view(f"Cleared the engine cache: {removed} engine(s), {fmt_bytes(freed)}.")

    def self_check():
        """Streams the rows as they finish; the doctor runs on a thread of its own."""
        rows: list[Any] = []
        done, box = threading.Event(), {}

        def work() -> None:
            try:
                box["result"] = service.self_check(on_check=rows.append)
            except Exception as exc:  # shown as a message below, like every other failure
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="prism-self-check", daemon=True).start()
        while not done.wait(1.0):
            yield self_check_markdown(None, rows), gr.update(visible=False)
        if "error" in box:
            raise ui_error(box["error"], "self_check")
        report, path = box["result"]
        yield self_check_markdown(report, report.checks), gr.update(value=str(path), visible=True)

    outputs = view_outputs + [message]
    light = dict(concurrency_limit=None, show_progress="minimal")
    refresh.click(run_once(status), None, outputs, api_name="system_status", **light)
    unload.click(run_once(unload_model), to_unload, outputs, api_name="unload_model", **light)
    unload_all.click(run_once(unload_everything), None, outputs, api_name="unload_all", **light)
    clear.click(run_once(clear_cache), None, outputs, api_name="clear_engine_cache", **light)
    check.click(self_check, None, [check_report, check_file], api_name="self_check", concurrency_limit=1,
                concurrency_id="prism-self-check")
    return run_once(status), outputs
