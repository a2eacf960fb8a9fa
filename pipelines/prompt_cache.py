"""Prompt encodings kept between jobs: a job whose prompt was encoded before, by the same text encoders with the
same weights (precision, backend, LoRAs), reuses that encoding instead of running the encoders again, and does not
load them either. The common case it serves: a new seed, size, step count or sampler for the same prompt, and the
Compare tab, whose columns share 16-bit text encoders (ComfyUI caches conditioning across runs the same way).

What it saves: the text stage of each repeat (BENCHMARKS.md: 28-47 ms of a FLUX.1 image on an H200, 9% of
FLUX.1-schnell's 4 steps end to end), and on a memory budget too small to keep the text encoders resident, their
reload (T5-XXL is 9.5 GB in bf16). The entries are the encoders' outputs (about 4 MiB a FLUX.1 prompt at 512 T5
tokens in bf16), on the device the job ran on; `entries` bounds their number.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")

DEFAULT_ENTRIES = 32


class PromptCache:
    """A bounded least-recently-used map from (encoders' identity, prompt) to what encoding it returned."""

    def __init__(self, entries: int = DEFAULT_ENTRIES):
        self.entries = entries
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()  # one worker encodes at a time, but `clear` comes from other threads
        self.hits = 0
        self.misses = 0

    def get_or_encode(self, key: Hashable, encode: Callable[[], T]) -> T:
        """The value kept for `key`, else `encode()`'s (kept unless entries is 0; an exception keeps nothing)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]  # type: ignore[return-value]
        value = encode()
        with self._lock:
            self.misses += 1
            if self.entries > 0:
                self._items[key] = value
                while len(self._items) > self.entries:
                    self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
