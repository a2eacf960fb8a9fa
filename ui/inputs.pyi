"""Input widgets whose server side agrees with what they show: whole-number fields are typed `integer` in the
API and refuse a fraction or text with the field's name (never rounding 1.5 to 2 behind the user's back), and
a blank or null value means "the model's default" rather than a crash.

Range checks are left to `resolve_request`, which knows the chosen model's limits and says them.
"""
from __future__ import annotations

import math
from typing import Any

import gradio as gr


def _refuse(label: str | None, what: str, payload: Any) -> gr.Error:
    shown = repr(payload)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return gr.Error(f"{label or 'This value'} must be {what}; got {shown}.", print_exception=False)


def whole_number(label: str | None, payload: Any) -> int | None:
    """`payload` as an int; None when blank. Raises gr.Error for fractions, text and booleans."""
    if payload is None or (isinstance(payload, str) and not payload.strip()):
        return None
    if isinstance(payload, bool):
        raise _refuse(label, "a whole number", payload)
    if isinstance(payload, int):
        return payload
    if isinstance(payload, float) and math.isfinite(payload) and payload.is_integer():
        return int(payload)
    if isinstance(payload, str):
        try:
            return int(payload.strip())
        except ValueError:
            pass
    raise _refuse(label, "a whole number", payload)


def finite_number(label: str | None, payload: Any) -> float | None:
    """`payload` as a float; None when blank. Raises gr.Error for text, booleans, NaN and infinities."""
    if payload is None or (isinstance(payload, str) and not payload.strip()):
        return None
    if not isinstance(payload, bool):
        try:
            value = float(payload)
        except (TypeError, ValueError):
            value = math.nan
        if math.isfinite(value):
            return value
    raise _refuse(label, "a finite number", payload)

from gradio.events import Dependency

class WholeNumber(gr.Number):
    """A number box for whole numbers (sizes, seeds); give it precision=0 so the API types it `integer`."""

    is_template = True  # drawn by the parent's front-end component

    def preprocess(self, payload: Any) -> Any:
        return as_sent(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class WholeSlider(gr.Slider):
    """A slider for whole numbers (steps, images); give it step=1, precision=0."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return as_sent(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class NumberSlider(gr.Slider):
    """A slider for a real number (guidance)."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return as_sent(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class Prompt(gr.Textbox):
    """A text box whose API value must be text (a number or list is refused, not turned into its repr)."""

    is_template = True

    def preprocess(self, payload: Any) -> str | None:
        if payload is None or isinstance(payload, str):
            return payload
        raise gr.Error(f"{self.label or 'This field'} must be text.", print_exception=False)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component
class FreeChoice(gr.Dropdown):
    """A dropdown whose choices change while the app runs (resident models): typed `str` in the API, since an
    empty `Literal[]` there would say nothing can be sent. The handler checks the name."""

    is_template = True

    def api_info(self) -> dict[str, Any]:
        return {"type": "string"}
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component

    