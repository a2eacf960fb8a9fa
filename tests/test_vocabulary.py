"""A closed-vocabulary model (the embedded demos) says which words of a prompt it does not know."""
from __future__ import annotations

import json

import pytest

from pipelines.demo.edits import held_out_edits
from pipelines.demo.scenes import held_out_captions
from pipelines.registry import UnknownModelError, read_local_spec, resolve_spec
from pipelines.request import GenerationRequest
from pipelines.vocabulary import unknown_words, vocabulary_note


def test_unknown_words_are_lower_cased_letters_in_first_seen_order_once_each():
    vocabulary = frozenset({"a", "red", "circle"})
    assert unknown_words("A RED circle, a Red Fox; fox-like 3 foxes!", vocabulary) == ["fox", "like", "foxes"]
    assert unknown_words("", vocabulary) == []
    assert unknown_words("a red circle", vocabulary) == []


def test_models_without_a_vocabulary_take_any_words():
    assert not resolve_spec("flux.1-dev").vocabulary
    assert vocabulary_note(resolve_spec("flux.1-dev"), "an astronaut riding a horse") is None


@pytest.mark.parametrize("model", ["demo-flux", "demo-sdxl", "demo-kontext"])
def test_the_shipped_vocabularies_hold_every_word_of_the_held_out_prompts(model):
    """What prism.json lists is what the models were trained on: none of the 200 held-out captions (nor, for the
    editor, the 200 held-out instructions) gets a note."""
    spec = resolve_spec(model)
    prompts = held_out_captions(200) + ([e.instruction for e in held_out_edits(200)] if model == "demo-kontext" else [])
    assert spec.vocabulary and [p for p in prompts if vocabulary_note(spec, p)] == []


def test_the_note_names_the_unknown_words_and_counts_what_it_does_not_list():
    spec = resolve_spec("demo-flux")
    note = vocabulary_note(spec, "An astronaut riding a red horse on the moon")
    assert note == (f"demo-flux knows only the {len(spec.vocabulary)} words it was trained on; these steer nothing: "
                    "'an', 'astronaut', 'riding', 'horse', 'moon'.")
    many = vocabulary_note(spec, "one two three four five six seven eight nine ten")
    assert many.endswith("'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight' and 2 more.")


def test_a_local_folder_declares_its_vocabulary_in_prism_json(tmp_path):
    import shutil

    from pipelines.registry import DEMO_MODELS_DIR

    folder = tmp_path / "my-demo"
    shutil.copytree(DEMO_MODELS_DIR / "demo-flux", folder)
    settings = json.loads((folder / "prism.json").read_text())
    (folder / "prism.json").write_text(json.dumps({**settings, "vocabulary": ["Red", "circle"]}))
    assert read_local_spec(folder).vocabulary == frozenset({"red", "circle"})
    (folder / "prism.json").write_text(json.dumps({**settings, "vocabulary": "red circle"}))
    with pytest.raises(UnknownModelError, match="must be a list of words"):
        read_local_spec(folder)


def test_a_result_carries_the_note_and_a_prompt_in_the_vocabulary_none(cpu_manager):
    odd = cpu_manager.generate(GenerationRequest(prompt="an astronaut riding a horse", model="demo-flux", seed=1))
    assert [w for w in odd.warnings if "knows only" in w] == [
        f"demo-flux knows only the {len(resolve_spec('demo-flux').vocabulary)} words it was trained on; "
        "these steer nothing: 'an', 'astronaut', 'riding', 'horse'."]
    plain = cpu_manager.generate(GenerationRequest(prompt=held_out_captions(1)[0], model="demo-flux", seed=1))
    assert not [w for w in plain.warnings if "knows only" in w]


@pytest.mark.parametrize("given,completed", [
    ("a red circle on a blue background", "a large red circle in the center on a blue background"),
    ("A red circle.", "a large red circle in the center on a white background"),
    ("a white star", "a large white star in the center on a black background"),  # white on white would vanish
    ("an orange star in the middle", "a large orange star in the center on a white background"),
    ("red circle at top left, small blue square at bottom right on black background",
     "a large red circle at the top left and a small blue square at the bottom right on a black background"),
    ("a red circle and a green star on a pink background",
     "a large red circle on the left and a large green star on the right on a pink background"),
    ("a red circle on the left and a blue square", "a large red circle on the left and a large blue square on the "
                                                   "right on a white background"),  # the free side of the pair
])
def test_looser_prompts_are_completed_to_the_caption_form(given, completed):
    from pipelines.demo.scenes import parse_caption
    from pipelines.vocabulary import completed_prompt

    assert completed_prompt(resolve_spec("demo-flux"), given) == completed
    parse_caption(completed)  # a caption the models were trained on


@pytest.mark.parametrize("given", [
    held_out_captions(1)[0],  # already a caption: drawn as given
    "an astronaut riding a horse",  # words outside the grammar: drawn as given, with the unknown-word note
    "a red circle on a red background",  # a shape the colour of its background
    "a red circle at the top and a blue square at the top",  # two shapes in one place
    "a red circle and a blue square and a green star",  # three shapes
    "", "on a blue background", "and",
])
def test_prompts_outside_the_grammar_or_already_in_it_are_left_alone(given):
    from pipelines.vocabulary import completed_prompt

    assert completed_prompt(resolve_spec("demo-flux"), given) is None
    assert completed_prompt(resolve_spec("flux.1-dev"), "a red circle") is None  # no grammar: any prompt as given
    assert completed_prompt(resolve_spec("demo-kontext"), "make the circle blue") is None  # instructions


@pytest.mark.parametrize("model", ["demo-flux", "demo-sdxl"])
def test_a_loose_prompt_draws_what_it_names_and_says_how_it_was_read(cpu_manager, model):
    """Before completion, demo-flux drew "a red circle on a blue background" as a green field (2026-12-07)."""
    from pipelines.demo.scorer import adherence

    given, drawn = "a red circle on a blue background", "a large red circle in the center on a blue background"
    results = [cpu_manager.generate(GenerationRequest(prompt=given, model=model, seed=seed, precision="bf16"))
               for seed in range(3)]
    assert results[0].request.prompt == drawn  # what the PNG's settings record is what was drawn
    assert f"{model} draws only the sentence form it was trained on, so '{given}' was drawn as '{drawn}'." \
        in results[0].warnings
    scores = adherence([r.images[0] for r in results], [drawn] * 3)
    assert scores["all_correct_rate"] == 1.0, scores


def test_a_prompt_grammar_in_prism_json_must_be_a_known_one(tmp_path):
    import shutil

    from pipelines.registry import DEMO_MODELS_DIR

    folder = tmp_path / "my-demo"
    shutil.copytree(DEMO_MODELS_DIR / "demo-flux", folder)
    settings = json.loads((folder / "prism.json").read_text())
    assert read_local_spec(folder).prompt_grammar == "demo-shapes"
    for wrong in ("english", ["demo-shapes"], 3):  # an unknown name, or not a name at all
        (folder / "prism.json").write_text(json.dumps({**settings, "prompt_grammar": wrong}))
        with pytest.raises(UnknownModelError, match="prompt_grammar.*demo-shapes"):
            read_local_spec(folder)
