"""The text stage of one job: prompt encodings through the manager's prompt cache (`Parts.remember`), with clock
marks around the encoders' own work, so the stage's time excludes loading them and is zero when every encoding
was remembered from an earlier job."""
from __future__ import annotations

from typing import Any, Callable, Hashable, TypeVar

import torch

from .run_context import Parts, Stopwatch

T = TypeVar("T")


class TextStage:
    def __init__(self, parts: Parts, clock: Stopwatch, encoders: tuple[str, ...], tokenizers: tuple[str, ...]):
        self.parts, self.clock, self.encoders, self.tokenizers = parts, clock, encoders, tokenizers
        self.marks: list[Any] = []

    def encoded(self, what: Hashable, encode: Callable[[], T]) -> T:
        """`encode()`'s value for `what` (a prompt and how it is cut), run only when no earlier job's is kept."""
        def compute() -> T:
            for name in (*self.tokenizers, *self.encoders):  # loaded before the clock starts
                self.parts.get(name)
            self.marks.append(self.clock.mark())
            with torch.inference_mode():
                value = encode()
            self.marks.append(self.clock.mark())
            return value

        return self.parts.remember(self.encoders, what, compute)

    def done(self) -> tuple[Any, Any]:
        """Release the encoders; the marks that bound the stage's time."""
        self.parts.done_with(*self.encoders)
        if not self.marks:  # all remembered: the stage took no encoder time
            self.marks = [self.clock.mark()] * 2
        return self.marks[0], self.marks[-1]
