"""`create_demo(service) -> gr.Blocks`: the tabs over a PrismService. Builds widgets only; nothing
loads until a request arrives."""
from __future__ import annotations

import inspect
import logging
import re
from typing import Any

import gradio as gr

from pipelines.families import FAMILIES
from pipelines.families.family import ImageUse
from pipelines.registry import Family

from .compare_tab import build_compare_tab
from .edit_tab import build_edit_tab
from .errors import one_line, ui_error
from .generate_tab import build_generate_tab
from .history import first_result
from .service import PrismService
from .system_tab import build_system_tab

log = logging.getLogger("prism.ui")

# Results are shown whole (contain) and small ones are enlarged with nearest-neighbour, so a 32x128 demo
# image is a crisp picture, not a blurred or cropped one. Display only: the files keep their pixels.
PRISM_CSS = """
.prism-images img, .prism-compare img, .prism-history img, .prism-input img { image-rendering: pixelated; }
/* Gradio draws each result in a square cell as wide as its column, taller than the box for two or fewer:
   cells fill the box's height instead, so the whole picture is always in view. */
.prism-images .grid-wrap .grid-container { height: 100%; }
.prism-images .grid-wrap .thumbnail-item { aspect-ratio: auto; }
/* An input image fills its box too: a 64x64 demo result chained with "Use as input" was drawn at 64 px. */
.prism-compare img, .prism-input img { width: 100%; height: 100%; object-fit: contain; }
/* History: a strip of small whole thumbnails. Gradio stretches two or three items across the whole width
   (each cropped to a wide cell), whatever `columns` says. */
.prism-history .grid-container { grid-template-columns: repeat(auto-fill, 120px) !important; }
.prism-history .thumbnail-item { width: 120px; height: 120px; }
.prism-history .thumbnail-item img { object-fit: contain; }
.prism-status p { margin: 0.2em 0; }
/* The status line says what went wrong in its own words, and Gradio drew its "Error" badge and a close button
   over them (a prompt-less Generate hid "describe the picture such as"; 2026-12-07): not there. The result
   boxes keep the badge. */
.prism-status > [data-testid="status-tracker"]:has(.error) { display: none; }
"""


class PrismBlocks(gr.Blocks):
    """gr.Blocks whose refusals of malformed API calls read like Prism's own: one sentence naming the field
    and what it takes (never Gradio's `{"error": null}` or a traceback in the log)."""

    def validate_inputs(self, block_fn: Any, inputs: list[Any]) -> None:
        if len(inputs) != len(block_fn.inputs):
            names = parameter_names(block_fn)
            raise gr.Error(f"This call sent {len(inputs)} value{'s' if len(inputs) != 1 else ''}; "
                           f"it takes at most {len(names)}: {', '.join(names)}.", print_exception=False)

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], *args: Any, **kwargs: Any) -> Any:
        # Values left off the end take their widgets' initial values, as gradio_client does for its callers, so
        # a plain HTTP call may name just a model and a prompt.
        inputs = [*inputs, *(getattr(b, "value", None) for b in block_fn.inputs[len(inputs):])]
        try:
            return await super().preprocess_data(block_fn, inputs, *args, **kwargs)
        except gr.Error as exc:
            raise ui_error(exc, block_fn.name or "request") from None
        except Exception as exc:  # a value Gradio could not read (wrong type or shape)
            log.warning("%s refused: unreadable input (%s)", block_fn.name, one_line(str(exc)))
            raise gr.Error(unreadable_input_message(block_fn, str(exc)), print_exception=False) from None


def unreadable_input_message(block_fn: Any, error: str) -> str:
    """One sentence on an input Gradio could not read: by name where its error says which ("Could not preprocess
    input component at index 2"), else the list of what the call takes."""
    names = parameter_names(block_fn)
    found = re.search(r"input component at index (\d+)", error)
    index = int(found.group(1)) if found else -1
    if not 0 <= index < len(names):
        return (f"A value sent is not of the type this call takes ({', '.join(names)}); the API page lists each "
                "parameter's type.")
    if isinstance(block_fn.inputs[index], (gr.Image, gr.ImageEditor)):
        return f"{names[index]} is not an image Prism can read; send a PNG, JPEG or WebP file."
    return f"{names[index]} is not of the type this call takes; the API page lists each parameter's type."


def parameter_names(block_fn: Any) -> list[str]:
    """The API's names for an event's inputs: its handler's parameters, else the widgets' labels."""
    try:
        params = [p.name for p in inspect.signature(block_fn.fn).parameters.values()
                  if p.name not in ("request", "progress")]
    except (TypeError, ValueError):
        params = []
    if len(params) == len(block_fn.inputs):
        return params
    return [str(getattr(b, "label", None) or type(b).__name__) for b in block_fn.inputs]


def to_edit_tab(paths):
    """A family tab's first result becomes the Edit tab's input, and the Edit tab opens."""
    return first_result(paths, "Generate an image first, then edit it."), gr.Tabs(selected="edit")


def create_demo(service: PrismService, title: str = "Prism") -> gr.Blocks:
    # Analytics off: Gradio would otherwise contact api.gradio.app (telemetry, version check) at startup.
    with PrismBlocks(title=title, analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(f"# {title}\nFlux.1, SDXL and FLUX.1 Kontext editing at 16-bit, FP8 and FP4 on "
                    f"{service.manager.info.name}.")
        with gr.Tabs() as tabs:
            sends = []  # each family tab's "Edit this picture" button and the files it sends
            for family in Family:
                if FAMILIES[family].image_use is ImageUse.START:  # families that edit an image share the Edit tab
                    with gr.Tab(family.label, id=family.value):
                        sends.append(build_generate_tab(service, family))
            with gr.Tab("Edit", id="edit"):
                edit_input = build_edit_tab(service)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(service)
            with gr.Tab("System", id="system") as system:
                refresh, outputs = build_system_tab(service)
        system.select(refresh, None, outputs, api_visibility="private", concurrency_limit=None,
                      show_progress="hidden")
        for button, files in sends:
            button.click(to_edit_tab, files, [edit_input, tabs], api_visibility="private", concurrency_limit=None,
                         show_progress="hidden")
        demo.load(refresh, None, outputs, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    # Jobs wait in the manager's bounded queue, where their position is known and reported, so Gradio lets
    # a few more requests through to it than it holds: one running, `max_queue` waiting, and at least one
    # more that then meets the "busy" answer instead of waiting unseen in Gradio's own queue.
    max_queue = service.manager.config.max_queue
    demo.queue(default_concurrency_limit=max_queue + 2, max_size=4 * (max_queue + 2))
    return demo
