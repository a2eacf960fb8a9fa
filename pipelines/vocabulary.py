"""What a model with a closed vocabulary (`ModelSpec.vocabulary`) reads of a prompt.

The embedded demo models were trained on a few dozen words ("a small red circle at the top left on a blue
background", "make the circle blue"); their tokenizers spell any other word letter by letter, which steers
nothing they learned. A new user's first prompt is rarely made of those words, so the result says which words
were not read, rather than leaving a picture of shapes to explain itself.

They also learned one sentence form: a model that names a prompt grammar (`ModelSpec.prompt_grammar`) is given
its looser prompts completed to that form ("a red circle" is drawn as "a large red circle in the center on a
white background"), and the result says so.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from .demo.scenes import complete_caption
from .registry import ModelSpec

_WORD = re.compile(r"[a-z]+")
SHOWN = 8  # unknown words listed by name; the rest are counted
# name (prism.json's "prompt_grammar") -> the prompt completed to the model's form, or None when it needs nothing
GRAMMARS: dict[str, Callable[[str], str | None]] = {"demo-shapes": complete_caption}


def completed_prompt(spec: ModelSpec, prompt: str) -> str | None:
    """`prompt` in the sentence form `spec` was trained on, when it names a grammar and `prompt` is a looser
    form of it; else None (the prompt is drawn as given)."""
    complete = GRAMMARS.get(spec.prompt_grammar)
    return complete(prompt) if complete else None


def completed_note(spec: ModelSpec, given: str, drawn: str) -> str:
    return (f"{spec.id} draws only the sentence form it was trained on, so '{given.strip()}' was drawn as "
            f"'{drawn}'.")


def unknown_words(prompt: str, vocabulary: frozenset[str]) -> list[str]:
    """The prompt's words (letters only, lower-cased, first occurrence order) that are not in `vocabulary`."""
    unknown: dict[str, None] = {}
    for word in _WORD.findall(prompt.lower()):
        if word not in vocabulary:
            unknown.setdefault(word)
    return list(unknown)


def vocabulary_note(spec: ModelSpec, prompt: str) -> str | None:
    """One line for the result when `spec` has a closed vocabulary and the prompt goes beyond it, else None."""
    if not spec.vocabulary:
        return None
    unknown = unknown_words(prompt, spec.vocabulary)
    if not unknown:
        return None
    shown = ", ".join(f"'{w}'" for w in unknown[:SHOWN])
    more = f" and {len(unknown) - SHOWN} more" if len(unknown) > SHOWN else ""
    return (f"{spec.id} knows only the {len(spec.vocabulary)} words it was trained on; these steer nothing: "
            f"{shown}{more}.")
