"""Edit pairs for the embedded editor (demo-kontext): a source scene, an instruction, the target scene.

    make the circle blue                      (colour)      turn the square into a star  (kind)
    move the circle to the top left           (move)        make the background yellow   (background)
    add a small red square at the bottom right (add)        remove the triangle          (remove)

The target differs from the source in the asked attribute only: the other shapes, the background and
every shape's jitter are kept, so a faithful edit of the source image is a render of the target, and
`scorer.score(image, target).all_correct` judges an edit (the asked change made, everything else kept).

A shape is named by its kind ("the circle"), or by colour and kind when the other shape has the same kind
("the red circle"); a source whose two shapes share both cannot be named and is not used for that edit.

Split: a fixed 5% of (source caption, instruction) pairs is held out (`split_of_edit`, a sha256 hash as
`scenes.split_of`), so the 200 evaluation edits of `held_out_edits` never occur in training.
"""
from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, replace

import numpy as np

from .scenes import (COLOURS, HELD_OUT_PERCENT, KINDS, MAX_OFFSET, MAX_SHAPES, POSITION_PHRASES, POSITIONS, SIZES,
                     Jitter, Rng, Scene, Shape, Split, _index, _pick, _shape_phrase, caption, sample_scene)


class EditKind(enum.Enum):
    COLOUR = "colour"
    KIND = "kind"
    MOVE = "move"
    BACKGROUND = "background"
    ADD = "add"
    REMOVE = "remove"


# The instructions' words besides scene words (colours, kinds, sizes, places); the editor's tokenizers add
# those the captions lack (`architectures.new_instruction_words`).
INSTRUCTION_WORDS = ("make", "the", "turn", "into", "move", "to", "add", "remove")
_EDIT_STREAM = 0xED17_0E7A  # keeps held_out_edits(seed=s) apart from a training rng seeded with s


@dataclass(frozen=True)
class Edit:
    kind: EditKind
    source: Scene  # the scene to edit
    instruction: str  # e.g. "make the circle blue"
    target: Scene  # the source with the asked change made, everything else (jitter included) kept

    def __post_init__(self) -> None:
        if self.source == self.target:
            raise ValueError(f"edit {self.instruction!r} leaves the scene unchanged")


def edit_key(source: Scene, instruction: str) -> str:
    """What identifies an edit for the split: the source's caption (shape order ignored) and the instruction."""
    return "|".join(sorted(_shape_phrase(s) for s in source.shapes) + [source.background, instruction])


def split_of_edit(source: Scene, instruction: str) -> Split:
    bucket = int.from_bytes(hashlib.sha256(edit_key(source, instruction).encode()).digest()[:8], "big") % 100
    return Split.HELD_OUT if bucket < HELD_OUT_PERCENT else Split.TRAIN


# --- naming shapes -------------------------------------------------------------------------------

def _name(scene: Scene, index: int) -> str | None:
    """The words that single out shape `index`: "circle", "red circle", or None when neither does."""
    shape, others = scene.shapes[index], [s for i, s in enumerate(scene.shapes) if i != index]
    if all(o.kind != shape.kind for o in others):
        return shape.kind
    if all((o.kind, o.colour) != (shape.kind, shape.colour) for o in others):
        return f"{shape.colour} {shape.kind}"
    return None


def _with_shape(scene: Scene, index: int, shape: Shape) -> Scene:
    shapes = list(scene.shapes)
    shapes[index] = shape
    return replace(scene, shapes=tuple(shapes))


# --- one sampler per edit kind: (instruction, target) or None when the source does not allow it --------

def _colour(rng: Rng, scene: Scene, index: int, name: str):
    shape = scene.shapes[index]
    colour = _pick(rng, tuple(c for c in COLOURS if c not in (shape.colour, scene.background)))
    return f"make the {name} {colour}", _with_shape(scene, index, replace(shape, colour=colour))


def _kind(rng: Rng, scene: Scene, index: int, name: str):
    shape = scene.shapes[index]
    kind = _pick(rng, tuple(k for k in KINDS if k != shape.kind))
    return f"turn the {name} into a {kind}", _with_shape(scene, index, replace(shape, kind=kind))


def _move(rng: Rng, scene: Scene, index: int, name: str):
    taken = {s.position for s in scene.shapes}
    position = _pick(rng, tuple(p for p in POSITIONS if p not in taken))
    return (f"move the {name} to the {position}",
            _with_shape(scene, index, replace(scene.shapes[index], position=position)))


def _remove(rng: Rng, scene: Scene, index: int, name: str):
    return f"remove the {name}", replace(scene, shapes=tuple(s for i, s in enumerate(scene.shapes) if i != index))


_SHAPE_EDITS = {EditKind.COLOUR: _colour, EditKind.KIND: _kind, EditKind.MOVE: _move, EditKind.REMOVE: _remove}


def _background(rng: Rng, scene: Scene):
    used = {scene.background} | {s.colour for s in scene.shapes}
    colour = _pick(rng, tuple(c for c in COLOURS if c not in used))
    return f"make the background {colour}", replace(scene, background=colour)


def _add(rng: Rng, scene: Scene):
    taken = {s.position for s in scene.shapes}
    shape = Shape(kind=_pick(rng, KINDS), colour=_pick(rng, tuple(c for c in COLOURS if c != scene.background)),
                  size=_pick(rng, tuple(SIZES)), position=_pick(rng, tuple(p for p in POSITIONS if p not in taken)),
                  jitter=Jitter(dx=float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)),
                                dy=float(rng.uniform(-MAX_OFFSET, MAX_OFFSET)), grow=float(rng.uniform(-1.0, 1.0))))
    words = f"a {shape.size} {shape.colour} {shape.kind} {POSITION_PHRASES[shape.position]}"
    return f"add {words}", replace(scene, shapes=scene.shapes + (shape,))


def sample_edit(rng: Rng, kind: EditKind, split: Split = Split.TRAIN) -> Edit:
    """An edit of `kind` from `split`, deterministic in `rng`: sources with one shape for ADD, two for REMOVE."""
    while True:  # rejection: ~1.05 draws for TRAIN, ~20 for HELD_OUT, a few more where a shape has no name
        shapes = {EditKind.ADD: 1, EditKind.REMOVE: MAX_SHAPES}.get(kind)
        source = sample_scene(rng, max_shapes=1 if shapes == 1 else MAX_SHAPES)
        if shapes is not None and len(source.shapes) != shapes:
            continue
        if kind in _SHAPE_EDITS:
            index = _index(rng, len(source.shapes))
            name = _name(source, index)
            if name is None:
                continue
            instruction, target = _SHAPE_EDITS[kind](rng, source, index, name)
        else:
            instruction, target = (_background if kind is EditKind.BACKGROUND else _add)(rng, source)
        if split_of_edit(source, instruction) is split:
            return Edit(kind, source, instruction, target)


def sample_edits(rng: Rng, n: int, split: Split = Split.TRAIN) -> list[Edit]:
    """`n` edits with their kinds drawn uniformly."""
    kinds = tuple(EditKind)
    return [sample_edit(rng, kinds[_index(rng, len(kinds))], split) for _ in range(n)]


def held_out_edits(n: int = 200, seed: int = 0) -> list[Edit]:
    """`n` distinct held-out edits, the kinds in turn (so 200 gives 33 or 34 of each), fixed for a seed."""
    rng = np.random.default_rng([_EDIT_STREAM, seed])
    kinds, edits, seen = tuple(EditKind), [], set()
    while len(edits) < n:
        edit = sample_edit(rng, kinds[len(edits) % len(kinds)], Split.HELD_OUT)
        key = edit_key(edit.source, edit.instruction)
        if key not in seen:
            seen.add(key)
            edits.append(edit)
    return edits


def describe(edit: Edit) -> str:
    """One line for logs and failure messages."""
    return f"{caption(edit.source)} --[{edit.instruction}]--> {caption(edit.target)}"
