"""Prism's Gradio web UI: `create_demo(service) -> gr.Blocks` over a PrismService (ui/service.py).

Importing this package loads nothing heavy: gradio, torch and the models come in when they are used.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_demo", "PrismService"]


def __getattr__(name: str) -> Any:  # lazy, so `import ui` (e.g. by the launcher's argument check) stays cheap
    if name == "create_demo":
        from .blocks import create_demo

        return create_demo
    if name == "PrismService":
        from .service import PrismService

        return PrismService
    raise AttributeError(name)
