"""The published recipe, run as a peer row by `python -m pipelines bench --peer torchao`: torchao's FP8 dynamic
per-row quantization of every Linear layer in the denoiser and torch.compile of the whole denoiser (the recipe of
huggingface/flux-fast; issue 17: 112.1 ms a Flux step on the H200 against our 106.8, after a 440 s compile).

It is a yardstick, not a Prism precision: nothing is kept in 16 bits, and the app never loads it.
"""
from __future__ import annotations

from torch import nn

from ..precision import FP8_MIN_CC, Capability
from ..request import RequestError

TORCHAO = "torchao"
RUNS_AS = "FP8 per-row (torchao)"


def quantize_peer(module: nn.Module, peer: str, capability: Capability | None) -> str:
    """Quantize `module` in place the peer's way; returns what it runs as. RequestError says what is missing."""
    if peer != TORCHAO:
        raise RequestError(f"Unknown peer {peer!r}; the one peer is {TORCHAO}.")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError:
        raise RequestError("The torchao peer row needs torchao; install it (pip install torchao) and run the "
                           "bench again, or leave out --peer.") from None
    if capability is None or tuple(capability) < FP8_MIN_CC:
        raise RequestError(f"The torchao peer row needs a GPU with FP8 tensor cores (compute capability "
                           f"{FP8_MIN_CC[0]}.{FP8_MIN_CC[1]} or newer); this device has none.")
    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return RUNS_AS
