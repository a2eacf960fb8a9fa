"""Example prompts per model, shown as clickable chips under the prompt: the demo models only know their
closed vocabulary of shapes, colours and places, so their examples use exactly those words."""
from __future__ import annotations

from PIL import Image

from pipelines.families import family_of
from pipelines.families.family import ImageUse
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


def empty_prompt_hint(spec: ModelSpec | None, examples_shown: bool = True) -> str:
    """What to do about an empty prompt; `examples_shown`: the tab has example chips under its prompt."""
    examples = example_prompts(spec)
    example = f" such as \"{examples[0]}\"" if examples else ""
    ask = ("Type an instruction first: say what to change in the image" if spec is not None
           and family_of(spec).image_use is ImageUse.CONTEXT else "Type a prompt first: describe the picture")
    return f"{ask}{example}" + (", or click one of the examples under the prompt." if examples_shown else ".")


# demo-kontext edits a picture of shapes, which a new user does not have at hand: each example brings its picture
# (the scene of a caption, drawn by the demo renderer) with an instruction in the editor's words.
DEMO_EDITS = (("make the circle blue", "a large red circle in the center on a white background"),
              ("move the star to the bottom right", "a large yellow star at the top left on a blue background"),
              ("remove the square", "a large green triangle on the left and a small purple square at the bottom right "
                                    "on a white background"),
              ("make the background pink", "a large orange diamond in the center on a white background"))
EDITS_BY_MODEL = {"demo-kontext": DEMO_EDITS}


def example_edits(spec: ModelSpec | None) -> tuple[tuple[str, str | None], ...]:
    """(instruction, caption of the picture it edits, or None: the user's own picture) for the Edit tab."""
    if spec is None:
        return ()
    return EDITS_BY_MODEL.get(spec.id, tuple((p, None) for p in family_of(spec).example_prompts))


def example_picture(caption: str) -> Image.Image:
    from pipelines.demo.architectures import IMAGE_SIZE
    from pipelines.demo.scenes import parse_caption, render

    return render(parse_caption(caption), IMAGE_SIZE)
