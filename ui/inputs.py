"""Input widgets whose server side agrees with what they show. Whole-number fields are typed `integer` in the
API, but their values reach `resolve_request` as sent: Gradio's own preprocessing would round 1.5 to 2 behind
the user's back, where the one validator says "seed must be a whole number; got 1.5" in the status line. A
blank or null value means "the default". (No __init__ of their own: Gradio reads the constructor's signature to
publish each widget's initial value as the API default.)
"""
from __future__ import annotations

from typing import Any

import gradio as gr


def as_sent(payload: Any) -> Any:
    """The value for the handler: None when blank, else exactly what was sent."""
    return None if payload is None or (isinstance(payload, str) and not payload.strip()) else payload


class WholeNumber(gr.Number):
    """A number box for whole numbers (sizes, seeds); give it precision=0 so the API types it `integer`."""

    is_template = True  # drawn by the parent's front-end component

    def preprocess(self, payload: Any) -> Any:
        return as_sent(payload)


class WholeSlider(gr.Slider):
    """A slider for whole numbers (steps, images); give it step=1, precision=0."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return as_sent(payload)


class NumberSlider(gr.Slider):
    """A slider for a real number (guidance)."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return as_sent(payload)


class Prompt(gr.Textbox):
    """A text box whose API value must be text (a number or list is refused, not turned into its repr)."""

    is_template = True

    def preprocess(self, payload: Any) -> str | None:
        if payload is None or isinstance(payload, str):
            return payload
        raise gr.Error(f"{self.label or 'This field'} must be text.", print_exception=False)


class FreeChoice(gr.Dropdown):
    """A dropdown whose choices change while the app runs (resident models): typed `str` in the API, since an
    empty `Literal[]` there would say nothing can be sent. The handler checks the name."""

    is_template = True

    def api_info(self) -> dict[str, Any]:
        return {"type": "string"}
