"""Example prompts per model, shown as clickable chips under the prompt: the demo models only know their
closed vocabulary of shapes, colours and places, so their examples use exactly those words."""
from __future__ import annotations

from pipelines.registry import Family, ModelSpec

DEMO = ("a large red circle in the center on a white background",
        "a small yellow star at the top left on a blue background",
        "a large green triangle on the left and a small purple square at the bottom right on a white background")
FLUX = ("a red fox sitting in fresh snow at sunrise, soft light, detailed fur",
        "a neon sign that says \"Prism\" on a rainy street at night, reflections on wet asphalt",
        "a watercolor painting of a lighthouse on a cliff, gentle waves")
SDXL = ("a cozy cabin in a snowy forest at dusk, warm light in the windows, highly detailed",
        "portrait of an old sailor with a grey beard, dramatic lighting, 85mm photo",
        "an isometric illustration of a tiny island city, pastel colors")

BY_MODEL = {"demo-flux": DEMO, "demo-sdxl": DEMO}
BY_FAMILY = {Family.FLUX: FLUX, Family.SDXL: SDXL}


def example_prompts(spec: ModelSpec | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    return BY_MODEL.get(spec.id, BY_FAMILY[spec.family])


def empty_prompt_hint(spec: ModelSpec | None) -> str:
    examples = example_prompts(spec)
    example = f" such as \"{examples[0]}\"" if examples else ""
    return f"Type a prompt first: describe the picture{example}, or click one of the examples under the prompt."
