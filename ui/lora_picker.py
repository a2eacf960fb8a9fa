"""The LoRA picker of the Flux.1, SDXL and Compare tabs: a few (LoRA, scale) rows.

Names come from the manager's loras/ folder, read again whenever a list is opened (a file dropped there shows
up without a restart). Whether a LoRA suits the model is checked by the manager when the job starts (a one-line
message otherwise); `<lora:NAME:SCALE>` typed into the prompt works as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import gradio as gr

from pipelines.lora import MAX_SCALE, MIN_SCALE

from .inputs import FreeChoice, NumberSlider
from .service import PrismService

SLOTS = 2  # rows shown; more LoRAs at once go in the prompt as <lora:NAME:SCALE>
NONE = ("None", "")


@dataclass(frozen=True)
class LoraPicker:
    names: tuple[gr.Dropdown, ...]
    scales: tuple[gr.Slider, ...]

    @property
    def inputs(self) -> list[Any]:
        """The widgets in handler-argument order: name, scale, name, scale, ..."""
        return [w for pair in zip(self.names, self.scales) for w in pair]


def build_lora_picker(service: PrismService, prefix: str) -> LoraPicker:
    """The rows, inside an accordion; call inside a Gradio layout."""
    names, scales = [], []
    with gr.Accordion("LoRAs", open=False, elem_id=f"{prefix}-loras"):
        gr.Markdown(f"From the `{service.manager.lora_library.folder.name}/` folder; `<lora:NAME:SCALE>` in the "
                    "prompt works too. Recorded in each PNG as Automatic1111 does.", elem_classes=["prism-note"])
        for i in range(SLOTS):
            with gr.Row():
                # Custom values pass: the manager's check answers an unknown name with the list of valid ones.
                name = FreeChoice([NONE, *service.lora_names()], value="", label=f"LoRA {i + 1}",
                                  elem_id=f"{prefix}-lora-{i + 1}", scale=3, allow_custom_value=True)
                scale = NumberSlider(MIN_SCALE, MAX_SCALE, 1.0, step=0.05, label="Scale",
                                     elem_id=f"{prefix}-lora-{i + 1}-scale", scale=2)
            name.focus(lambda: gr.update(choices=[NONE, *service.lora_names()]), None, name, api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")
            names.append(name)
            scales.append(scale)
    return LoraPicker(tuple(names), tuple(scales))


def chosen_loras(values: Sequence[Any]) -> tuple[tuple[str, Any], ...]:
    """(name, scale) pairs from the rows' values (name, scale, name, scale, ...); empty rows are skipped.
    A blank scale means 1; anything else goes to the request as sent (the manager's checks give the message)."""
    pairs = zip(values[0::2], values[1::2])
    return tuple((name, 1.0 if scale is None else scale) for name, scale in pairs if name)


def row_values(loras: Sequence[Sequence[Any]] | None) -> list[Any]:
    """The rows' values for recorded LoRAs (a history item's settings), padded with empty rows."""
    rows = [(str(name), float(scale)) for name, scale in (loras or ())][:SLOTS]
    rows += [("", 1.0)] * (SLOTS - len(rows))
    return [v for row in rows for v in row]
