"""Example prompts per model, shown as clickable chips under the prompt: the demo models only know their
closed vocabulary of shapes, colours and places, so their examples use exactly those words."""
from __future__ import annotations

from pipelines.families import family_of
from pipelines.registry import ModelSpec

DEMO = ("a large red circle in the center on a white background",
        "a small yellow star at the top left on a blue background",
        "a large green triangle on the left and a small purple square at the bottom right on a white background")
BY_MODEL = {"demo-flux": DEMO, "demo-sdxl": DEMO}


def example_prompts(spec: ModelSpec | None) -> tuple[str, ...]:
    """The demo models' own vocabulary, else a few good prompts for the model's family."""
    if spec is None:
        return ()
    return BY_MODEL.get(spec.id, family_of(spec).example_prompts)


def empty_prompt_hint(spec: ModelSpec | None) -> str:
    examples = example_prompts(spec)
    example = f" such as \"{examples[0]}\"" if examples else ""
    return f"Type a prompt first: describe the picture{example}, or click one of the examples under the prompt."
