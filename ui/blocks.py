"""`create_demo(service) -> gr.Blocks`: the four tabs over a PrismService. Builds widgets only; nothing
loads until a request arrives."""
from __future__ import annotations

import gradio as gr

from pipelines.registry import Family

from .compare_tab import build_compare_tab
from .generate_tab import build_generate_tab
from .service import PrismService
from .system_tab import build_system_tab


def create_demo(service: PrismService, title: str = "Prism") -> gr.Blocks:
    # Analytics off: Gradio would otherwise contact api.gradio.app (telemetry, version check) at startup.
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(f"# {title}\nFlux.1 and SDXL at 16-bit, FP8 and FP4 on {service.manager.info.name}.")
        with gr.Tabs():
            for family in Family:
                with gr.Tab(family.label, id=family.value):
                    build_generate_tab(service, family)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(service)
            with gr.Tab("System", id="system") as system:
                refresh, outputs = build_system_tab(service)
        system.select(refresh, None, outputs, api_visibility="private", concurrency_limit=None,
                      show_progress="hidden")
        demo.load(refresh, None, outputs, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    # Jobs wait in the manager's bounded queue, where their position is known and reported, so Gradio lets
    # a few more requests through to it than it holds: one running, `max_queue` waiting, and at least one
    # more that then meets the "busy" answer instead of waiting unseen in Gradio's own queue.
    max_queue = service.manager.config.max_queue
    demo.queue(default_concurrency_limit=max_queue + 2, max_size=4 * (max_queue + 2))
    return demo
