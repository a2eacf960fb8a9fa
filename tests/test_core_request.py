"""Validation happens before any model work, and every message says what to change."""
from __future__ import annotations

import pytest

from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.precision import Backend, Precision, SupportLevel, precision_support
from pipelines.request import GenerationRequest, RequestError, resolve_request
from pipelines.registry import resolve_spec

H100, ADA, AMPERE, TURING, SPARK = (9, 0), (8, 9), (8, 0), (7, 5), (12, 1)


def resolve(model="flux.1-dev", capability=H100, backend=Backend.TORCH, **fields):
    fields.setdefault("prompt", "a fox")
    return resolve_request(GenerationRequest(model=model, **fields), resolve_spec(model), capability, backend)


def test_defaults_come_from_the_model_spec():
    schnell = resolve("flux.1-schnell")
    assert (schnell.steps, schnell.guidance, schnell.width, schnell.height) == (4, 0.0, 1024, 1024)
    turbo = resolve("sdxl-turbo")
    assert (turbo.steps, turbo.guidance, turbo.width, turbo.height) == (1, 0.0, 512, 512)
    dev = resolve("flux.1-dev")
    assert (dev.steps, dev.guidance) == (28, 3.5)


def test_random_seed_is_chosen_and_reported():
    a, b = resolve(seed=None), resolve(seed=-1)
    assert isinstance(a.seed, int) and 0 <= a.seed < 2**32 and isinstance(b.seed, int)
    assert resolve(seed=1234).seed == 1234


@pytest.mark.parametrize("model,fields,needle", [
    ("flux.1-dev", {"width": 1000}, "multiple of 16; use 992 or 1008"),
    ("sdxl-base-1.0", {"height": 1020}, "multiple of 8; use 1016 or 1024"),
    ("flux.1-dev", {"width": 4096}, "outside 256..2048"),
    ("sdxl-base-1.0", {"width": 128}, "outside 256..2048"),
    ("flux.1-dev", {"steps": 0}, "steps must be between 1 and 100"),
    ("flux.1-dev", {"steps": 500}, "steps must be between 1 and 100"),
    ("flux.1-dev", {"guidance": -1}, "guidance must be between 0 and 30"),
    ("flux.1-dev", {"num_images": 0}, "number of images must be between 1 and 8"),
    ("flux.1-dev", {"negative_prompt": "blurry"}, "does not use a negative prompt; clear the negative prompt"),
    ("sdxl-turbo", {"negative_prompt": "blurry"}, "does not use a negative prompt"),
    ("sdxl-base-1.0", {"negative_prompt": "blurry", "guidance": 1.0}, "raise guidance or clear the negative prompt"),
    ("flux.1-dev", {"seed": 2**40}, "seed must be between 0 and"),
    ("flux.1-dev", {"precision": "int8"}, "choose one of: fp16, bf16, fp8, fp4"),
    ("flux.1-dev", {"steps": "many"}, "steps must be a whole number"),
])
def test_bad_requests_say_what_to_change(model, fields, needle):
    with pytest.raises(RequestError) as err:
        resolve(model, **fields)
    assert needle in str(err.value)


def test_precision_unsupported_on_this_gpu_is_refused_with_the_reason():
    with pytest.raises(RequestError, match="FP8 needs compute capability 8.9 or newer.*this GPU is 8.0. Choose bf16"):
        resolve(capability=AMPERE, precision="fp8")
    with pytest.raises(RequestError, match="BF16 needs compute capability 8.0"):
        resolve(capability=TURING, precision="bf16")
    with pytest.raises(RequestError, match="TensorRT FP4 engines need FP4 tensor cores"):
        resolve(capability=H100, precision="fp4", backend=Backend.TENSORRT)


def test_sdxl_negative_prompt_with_guidance_is_accepted():
    req = resolve("sdxl-base-1.0", negative_prompt="  blurry  ", guidance=7)
    assert req.negative_prompt == "blurry"


@pytest.mark.parametrize("cc,backend,precision,level,runs_as", [
    (None, Backend.TORCH, "fp8", SupportLevel.EMULATED, "FP8 (CPU emulation)"),
    (None, Backend.TORCH, "fp4", SupportLevel.EMULATED, "FP4 weights, 16-bit compute"),
    (H100, Backend.TORCH, "fp8", SupportLevel.NATIVE, "FP8"),
    (H100, Backend.TORCH, "fp4", SupportLevel.EMULATED, "FP4 weights, 16-bit compute"),
    (ADA, Backend.TENSORRT, "fp8", SupportLevel.NATIVE, "FP8"),
    (SPARK, Backend.TORCH, "fp4", SupportLevel.NATIVE, "FP4"),
    (SPARK, Backend.TENSORRT, "fp4", SupportLevel.NATIVE, "FP4"),
    (AMPERE, Backend.TORCH, "fp8", SupportLevel.UNSUPPORTED, "-"),
    (H100, Backend.TENSORRT, "fp4", SupportLevel.UNSUPPORTED, "-"),
    (None, Backend.TENSORRT, "bf16", SupportLevel.UNSUPPORTED, "-"),
])
def test_precision_support_matrix(cc, backend, precision, level, runs_as):
    support = precision_support(Precision(precision), cc, backend)
    assert (support.level, support.runs_as) == (level, runs_as)
    assert support.reason.endswith(".")


class CountingBackend:
    """Stands in for the torch backend to prove that bad requests never reach model loading."""

    name = "torch"
    loads = 0

    def describe(self):
        return "counting"

    def load(self, *args, **kwargs):
        CountingBackend.loads += 1
        raise AssertionError("a bad request reached model loading")


@pytest.mark.parametrize("fields,needle", [
    ({"model": "no-such-model"}, "Unknown model 'no-such-model'. Choose one of: flux.1-dev, flux.1-schnell"),
    ({"width": 1001}, "not a multiple of 16"),
    ({"negative_prompt": "x"}, "does not use a negative prompt"),
    ({"precision": "fp8", "backend": "tensorrt"}, "TensorRT backend cannot run here"),
    ({"prompt": "x" * 10_000_000}, "The prompt is 10,000,000 characters long; the limit is 4,000 characters"),
])
def test_manager_rejects_bad_requests_before_loading_anything(fields, needle):
    manager = PipelineManager(ManagerConfig(device="cpu"), backends={Backend.TORCH: CountingBackend()})
    try:
        request = GenerationRequest(**{"prompt": "a fox", "model": "flux.1-schnell", **fields})
        with pytest.raises(RequestError) as err:
            manager.generate(request, timeout=30)
        assert needle in str(err.value)
        assert CountingBackend.loads == 0
    finally:
        manager.close()


def test_prompt_caps_are_stated_in_characters_and_bytes():
    from pipelines.request import MAX_PROMPT_BYTES, MAX_PROMPT_CHARS

    assert resolve(prompt="a" * MAX_PROMPT_CHARS).prompt == "a" * MAX_PROMPT_CHARS  # the cap itself is allowed
    with pytest.raises(RequestError, match=r"The prompt is 4,001 characters long; the limit is 4,000 characters "
                                           r"\(12,000 bytes of UTF-8\)\. Shorten it\."):
        resolve(prompt="a" * (MAX_PROMPT_CHARS + 1))
    emoji = "\U0001F98A" * (MAX_PROMPT_BYTES // 4 + 1)  # few characters, many bytes
    with pytest.raises(RequestError, match="The prompt is 12,004 bytes long in UTF-8; the limit is 12,000 bytes"):
        resolve(prompt=emoji)
    with pytest.raises(RequestError, match="The negative prompt is 5,000 characters long"):
        resolve("sdxl-base-1.0", prompt="a fox", negative_prompt="b" * 5000)


def test_lone_surrogates_and_non_text_prompts_are_refused_with_one_line():
    with pytest.raises(RequestError, match="invalid character at position 3 \\(half of a UTF-16 surrogate pair\\)"):
        resolve(prompt="ab\ud800c")
    with pytest.raises(RequestError, match="The prompt must be text"):
        resolve(prompt=None)


def test_control_characters_in_prompts_are_refused_but_tabs_and_new_lines_are_text():
    with pytest.raises(RequestError, match=r"The prompt contains a control character \(U\+0000\) at position 2; remove it\."):
        resolve(prompt="a\x00fox")
    with pytest.raises(RequestError, match=r"The negative prompt contains a control character \(U\+001B\) at position 1"):
        resolve("sdxl-base-1.0", prompt="a fox", negative_prompt="\x1b[31m")
    with pytest.raises(RequestError, match=r"\(U\+007F\)"):
        resolve(prompt="a fox\x7f")
    assert resolve(prompt="a fox\tin snow\r\nat dawn").prompt.endswith("in snow at dawn")  # line breaks become spaces


def test_size_suggestions_stay_inside_the_allowed_range():
    with pytest.raises(RequestError, match=r"width 2 is not a multiple of 16; use 256\.$"):
        resolve(width=2)
    with pytest.raises(RequestError, match="width 40 is not a multiple of 16; use 256"):
        resolve(width=40)
    with pytest.raises(RequestError, match="width 1001 is not a multiple of 16; use 992 or 1008"):
        resolve(width=1001)


@pytest.mark.parametrize("model,size,expected", [
    ("flux.1-dev", (1536, 1024), (1248, 832)),  # a landscape photo stays landscape, about the default's pixels
    ("flux.1-dev", (3024, 4032), (880, 1184)),  # a phone's portrait photo
    ("sdxl-base-1.0", (1536, 1024), (1248, 832)),  # 3:2 exactly (1256x840, the nearest area, is not)
    ("demo-flux", (4000, 3000), (64, 48)),  # 4:3 kept at demo-flux's coarse steps (not 80x48)
    ("sdxl-base-1.0", (800, 800), (1024, 1024)),  # a square input gets the default size
    ("flux.1-dev", (4000, 100), (2048, 256)),  # a strip: each side within the model's limits
])
def test_image_to_image_keeps_the_input_shape_when_no_size_is_given(model, size, expected):
    from PIL import Image

    req = resolve(model, image=Image.new("RGB", size, (90, 40, 20)))
    assert (req.width, req.height) == expected
    assert resolve_spec(model).size.check(req.width, req.height) is None
    spec = resolve_spec(model)
    wide = (spec.default_width, spec.default_height // 2)
    asked = resolve(model, image=Image.new("RGB", size, (90, 40, 20)), width=wide[0], height=wide[1])
    assert (asked.width, asked.height) == wide  # a size asked for wins
