"""The Edit tab's examples: demo-kontext's bring their own picture and are edits it makes; a real Kontext model's
are instructions alone."""
from __future__ import annotations

import pytest

from pipelines.demo.scorer import score
from pipelines.registry import resolve_spec
from pipelines.request import GenerationRequest
from pipelines.vocabulary import vocabulary_note
from ui.examples import DEMO_EDITS, example_edits, example_picture

# What each demo example should come out as, as a caption the scorer checks.
EXPECTED = {
    "make the circle blue": "a large blue circle in the center on a white background",
    "move the star to the bottom right": "a large yellow star at the bottom right on a blue background",
    "remove the square": "a large green triangle on the left on a white background",
    "make the background pink": "a large orange diamond in the center on a pink background",
}


def test_demo_kontext_examples_bring_a_picture_of_their_caption_in_the_editors_words():
    spec = resolve_spec("demo-kontext")
    assert example_edits(spec) == DEMO_EDITS and set(EXPECTED) == {text for text, _ in DEMO_EDITS}
    for text, caption in DEMO_EDITS:
        assert vocabulary_note(spec, text) is None
        picture = example_picture(caption)
        assert picture.size == (64, 64) and score(picture, caption).all_correct, caption


def test_a_real_kontext_model_offers_instructions_without_pictures():
    examples = example_edits(resolve_spec("flux.1-kontext-dev"))
    assert examples and all(caption is None for _, caption in examples)
    assert example_edits(None) == ()


@pytest.mark.parametrize("text,caption", DEMO_EDITS)
def test_demo_kontext_makes_each_example_edit(cpu_manager, text, caption):
    """What a new user clicks first must work: each example, at two seeds, through the manager as the tab runs it."""
    for seed in (0, 1):
        result = cpu_manager.generate(GenerationRequest(prompt=text, model="demo-kontext", seed=seed,
                                                        image=example_picture(caption)))
        assert score(result.images[0], EXPECTED[text]).all_correct, (text, seed)


def test_an_empty_prompt_hint_asks_an_editor_for_an_instruction_and_points_only_at_examples_that_are_shown():
    from ui.examples import empty_prompt_hint

    flux = empty_prompt_hint(resolve_spec("demo-flux"))
    assert flux.startswith("Type a prompt first: describe the picture such as \"a large red circle")
    assert flux.endswith("or click one of the examples under the prompt.")
    assert empty_prompt_hint(resolve_spec("demo-flux"), examples_shown=False).endswith("on a white background\".")
    edit = empty_prompt_hint(resolve_spec("flux.1-kontext-dev"), examples_shown=False)
    assert edit == "Type an instruction first: say what to change in the image such as \"make the sky red\"."
