"""What a user asks for (GenerationRequest) and what they get back (GenerationResult).

`resolve_request` is the one place input is validated: it fills defaults from the model spec and
raises RequestError, whose message says what to change, before any model work starts.
"""
from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from .precision import Backend, Capability, Precision, precision_support
from .registry import HUB_MODELS, ModelSpec
from .schedulers import find_sampler
from .step_cache import check_name as check_cache

if TYPE_CHECKING:
    from .image_input import InputImage

MAX_SEED = 2**32 - 1  # A1111 / ComfyUI convention; seeds round-trip through their UIs
DEFAULT_STRENGTH = 0.6  # diffusers' FluxImg2ImgPipeline default
DEFAULT_MASK_BLUR = 4  # pixels, A1111's default
DEFAULT_REFINER_SWITCH = 0.8  # the base runs this fraction of the steps (diffusers' SDXL refiner example)
MAX_MASK_BLUR = 64
# Prompt caps, checked before any work: T5 reads at most 512 tokens (about 2,000 characters of English), so
# 4,000 characters loses nothing a model could use; the byte cap bounds what any text costs to encode and to
# store (twice) in each PNG. Without them one 50 MB prompt held the worker for minutes and wrote a 105 MB PNG.
MAX_PROMPT_CHARS = 4000
MAX_PROMPT_BYTES = 12000  # UTF-8; 3 bytes per character covers CJK text at the character cap


class RequestError(ValueError):
    """Bad input. The message is shown to the user as-is and says what to change."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    model: str
    precision: Precision = Precision.BF16
    negative_prompt: str = ""
    width: int | None = None  # None: the model's default
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None or -1: a random seed, reported back
    num_images: int = 1
    backend: str = "auto"  # auto | torch | tensorrt
    # Image to image: the input (pipelines.image_input.read_image) and how much of it is repainted, from
    # 0 (keep it) to 1 (ignore it); None: DEFAULT_STRENGTH. For a model that edits images (Kontext) the image
    # is required and the picture the prompt's instruction changes; it takes no strength.
    image: "InputImage | None" = None
    strength: float | None = None
    # Inpainting: a mask of the input's size, white = repaint; its blur in pixels for pasting the result back;
    # and whether to repaint only the region around the mask, at the full requested resolution.
    mask: "InputImage | None" = None
    mask_blur: int = DEFAULT_MASK_BLUR
    only_masked: bool = False
    # SDXL refiner: the fraction of the steps the base runs before its refiner finishes from its latents
    # (diffusers' denoising_end / denoising_start); None: no refiner.
    refiner: float | None = None
    sampler: str = ""  # a name from pipelines.schedulers ("DPM++ 2M Karras"); empty: the model's own scheduler
    # (name in the loras/ folder, scale) pairs; <lora:NAME:SCALE> in the prompt adds to them (pipelines.lora).
    loras: tuple[tuple[str, float], ...] = ()
    cache: str = "off"  # step caching (pipelines.step_cache): "off" or "fast" (some steps reuse the last output)

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain values; an input image by its SHA-256 (PNGs get shared, uploads are private)."""
        d = asdict(replace(self, image=None, mask=None))
        d["precision"] = Precision.parse(self.precision).value
        del d["image"], d["mask"]
        if self.strength is None:  # no input image, or an edit (which has no strength)
            del d["strength"]
        if self.image is not None:
            d["input_image_sha256"] = self.image.sha256
        if self.mask is None:
            del d["mask_blur"], d["only_masked"]
        else:
            d["mask_sha256"] = self.mask.sha256
        if self.refiner is None:
            del d["refiner"]
        d["loras"] = [[name, scale] for name, scale in self.loras]
        return d


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds per stage, measured with CUDA events on a GPU and a monotonic clock on a CPU."""

    text_encoders_ms: float
    steps_ms: tuple[float, ...]
    vae_ms: float
    load_ms: float = 0.0  # loading models / building engines for this job (not part of total_ms)
    vae_encoder_ms: float = 0.0  # image to image: encoding the input image
    refiner_steps: int = 0  # how many of `steps_ms` the refiner ran (the last ones)
    model_calls: int | None = None  # steps that ran the denoiser (fewer than steps with step caching); None: all

    @property
    def total_ms(self) -> float:
        """Text encoders + (VAE encoder) + denoising + VAE: the work a warm pipeline does for this request."""
        return self.text_encoders_ms + self.vae_encoder_ms + self.denoise_ms + self.vae_ms

    @property
    def denoise_ms(self) -> float:
        return sum(self.steps_ms)

    @property
    def prompt_reused(self) -> bool:
        """The text stage ran no encoder: an earlier job's encoding of the prompt was reused (its clock marks are
        one mark twice, pipelines/text_stage.py; any encoder run takes time)."""
        return self.text_encoders_ms == 0.0

    @property
    def mean_step_ms(self) -> float:
        return self.denoise_ms / len(self.steps_ms) if self.steps_ms else 0.0

    def summary(self) -> str:
        encoder = f"VAE encoder {self.vae_encoder_ms:.0f} ms | " if self.vae_encoder_ms else ""
        refined = f" ({len(self.steps_ms) - self.refiner_steps} base + {self.refiner_steps} refiner)" \
            if self.refiner_steps else ""
        if self.model_calls is not None and self.model_calls < len(self.steps_ms):
            refined += f" ({self.model_calls} ran the model)"
        text = "text encoders: prompt reused" if self.prompt_reused else f"text encoders {self.text_encoders_ms:.0f} ms"
        return (f"{text} | {encoder}{len(self.steps_ms)} steps{refined} x "
                f"{self.mean_step_ms:.1f} ms = {self.denoise_ms:.0f} ms | VAE {self.vae_ms:.0f} ms | "
                f"total {self.total_ms:.0f} ms" + (f" (+ load {self.load_ms:.0f} ms)" if self.load_ms else ""))


@dataclass(frozen=True)
class GenerationResult:
    request: GenerationRequest  # resolved: every default filled, the seed chosen (model as the user gave it)
    model_id: str  # the registry id, or a local folder's name
    images: tuple[Image.Image, ...]
    seeds: tuple[int, ...]
    timings: StageTimings
    peak_memory_bytes: int | None  # None on a CPU
    backend: str  # what ran the denoiser: "torch", "torch+compile", "tensorrt"
    runs_as: str  # what precision actually executed, e.g. "FP4 weights, 16-bit compute"
    device: str
    warnings: tuple[str, ...] = field(default_factory=tuple)
    lora_hashes: tuple[tuple[str, str], ...] = ()  # (name, Automatic1111 short hash) of each LoRA used
    refiner_id: str = ""  # the refiner that finished the images (registry id or folder name), when one ran

    def settings(self) -> dict[str, Any]:
        """Every setting needed to reproduce the result; saved into each PNG."""
        # The model by name, never a local folder's path: PNGs get shared, paths are private.
        refiner = {"refiner_model": self.refiner_id} if self.refiner_id else {}
        return {**self.request.to_dict(), "model": self.model_id, "seeds": list(self.seeds), "backend": self.backend,
                "runs_as": self.runs_as, "device": self.device, "lora_hashes": dict(self.lora_hashes), **refiner}


def resolve_request(req: GenerationRequest, spec: ModelSpec, capability: Capability | None,
                    backend: Backend = Backend.TORCH) -> GenerationRequest:
    """Fill defaults from `spec`, check every field, pick a seed. Raises RequestError.

    LoRA names and scales are checked here (and `<lora:...>` tags moved out of the prompt); whether the
    files exist and fit the model is `pipelines.lora.load_set`, which the manager runs next."""
    from .families import family_of  # the family modules and pipelines.lora import this module
    from .image_input import read_image  # it raises RequestError, defined here
    from .lora import check_loras, parse_prompt

    if spec.is_refiner:
        bases = [s.id for s in HUB_MODELS if s.refiner == spec.id] or ["its SDXL base model"]
        raise RequestError(f"{spec.id} is a refiner: it finishes a base model's images and does not run alone. "
                           f"Choose {' or '.join(bases)} and turn the refiner on (--refiner 0.8).")
    check_prompt("prompt", req.prompt)
    check_prompt("negative prompt", req.negative_prompt or "")
    prompt, tagged = parse_prompt(req.prompt)
    loras = check_loras((*(req.loras or ()), *tagged))
    try:
        precision = Precision.parse(req.precision)
    except ValueError as e:
        raise RequestError(str(e)) from None
    default_size, edit = (spec.default_width, spec.default_height), _edit_input(req, spec, prompt)
    image = edit
    if edit is not None:  # an edit's output is, unless asked otherwise, the size its input is resized to
        default_size = family_of(spec).context_size(spec, edit.size)
        image = _noting_a_stretch(spec, edit, default_size)
    elif req.image is not None:  # image to image: unless asked otherwise, the input's shape at the default area
        image = read_image(req.image)
        default_size = spec.size.keeping_shape(image.size, spec.default_width * spec.default_height)
    width = default_size[0] if req.width is None else _as_int("width", req.width)
    height = default_size[1] if req.height is None else _as_int("height", req.height)
    steps = spec.default_steps if req.steps is None else _as_int("steps", req.steps)
    guidance = spec.default_guidance if req.guidance is None else _as_float("guidance", req.guidance)
    num_images = _as_int("number of images", req.num_images)
    negative = (req.negative_prompt or "").strip()

    problem = spec.size.check(width, height)
    if problem:
        raise RequestError(f"{spec.id}: {problem}")
    if not 1 <= steps <= spec.max_steps:
        raise RequestError(f"steps must be between 1 and {spec.max_steps} for {spec.id}; got {steps}.")
    if not 0 <= guidance <= spec.max_guidance:
        raise RequestError(f"guidance must be between 0 and {spec.max_guidance:g}; got {guidance:g}.")
    if not 1 <= num_images <= spec.max_images:
        raise RequestError(f"number of images must be between 1 and {spec.max_images}; got {num_images}.")
    if negative and not spec.supports_negative_prompt:
        raise RequestError(f"{spec.id} does not use a negative prompt; clear the negative prompt field.")
    if negative and guidance <= 1.0:
        raise RequestError(f"A negative prompt only acts when guidance is above 1 (it is {guidance:g}); "
                           "raise guidance or clear the negative prompt.")

    strength = None
    if req.image is not None and edit is None:
        strength = DEFAULT_STRENGTH if req.strength is None else _as_float("strength", req.strength)
        if not 0 < strength <= 1:
            raise RequestError(f"strength must be above 0 and at most 1 (1 repaints the whole image); got {strength:g}.")
    elif req.strength is not None:
        raise RequestError("strength applies to an input image; give an image or clear strength.")
    mask, mask_blur = None, _as_int("mask blur", req.mask_blur)
    if req.mask is not None:
        if image is None:
            raise RequestError("A mask needs an input image to paint into; give an image or clear the mask.")
        mask = read_image(req.mask, "mask")
        if mask.size != image.size:
            raise RequestError(f"The mask is {mask.size[0]}x{mask.size[1]} but the input image is "
                               f"{image.size[0]}x{image.size[1]}; give a mask of the image's size.")
        if mask.image.convert("L").getextrema()[1] < 128:
            raise RequestError("The mask is empty: paint the area to repaint in white.")
        if not 0 <= mask_blur <= MAX_MASK_BLUR:
            raise RequestError(f"mask blur must be between 0 and {MAX_MASK_BLUR} pixels; got {mask_blur}.")
    elif req.only_masked:
        raise RequestError("'Only masked' needs a mask; give one or turn the option off.")
    refiner = None
    if req.refiner is not None:
        refiner = _as_float("refiner switch", req.refiner)
        if spec.refiner is None:
            with_one = [s.id for s in HUB_MODELS if s.refiner]
            raise RequestError(f"{spec.id} has no refiner (the refiner finishes {' and '.join(with_one)} images); "
                               "turn the refiner off or choose that model.")
        if not 0 < refiner < 1:
            raise RequestError(f"refiner switch must be above 0 and below 1 (the fraction of the steps the base model "
                               f"runs before the refiner takes over; {DEFAULT_REFINER_SWITCH:g} is usual); got {refiner:g}.")
        if mask is not None:
            raise RequestError("The refiner does not run with an inpainting mask; clear the mask or turn the refiner off.")
    sampler = (req.sampler or "").strip() if isinstance(req.sampler, str) or req.sampler is None else req.sampler
    if not isinstance(sampler, str):
        raise RequestError(f"sampler must be a name; got {sampler!r}.")
    if sampler:
        try:
            find_sampler(spec.family, sampler)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    try:
        cache = check_cache(req.cache)
    except ValueError as exc:
        raise RequestError(str(exc)) from None

    support = precision_support(precision, capability, backend)
    if not support.runnable:
        raise RequestError(f"{precision.value} cannot run here: {support.reason}")

    seed = req.seed
    if seed is None or seed == -1:
        seed = secrets.randbelow(MAX_SEED - num_images + 1)
    else:
        seed = _as_int("seed", seed)
        if not 0 <= seed <= MAX_SEED - num_images + 1:
            raise RequestError(f"seed must be between 0 and {MAX_SEED - num_images + 1} (or -1 for random); got {seed}.")

    return replace(req, prompt=prompt, precision=precision, negative_prompt=negative, width=width, height=height,
                   steps=steps, guidance=guidance, seed=seed, num_images=num_images, sampler=sampler, image=image,
                   strength=strength, mask=mask, mask_blur=mask_blur, only_masked=bool(req.only_masked), loras=loras,
                   cache=cache, refiner=refiner)


def _noting_a_stretch(spec: ModelSpec, edit: "InputImage", size: tuple[int, int]) -> "InputImage":
    """The edit's input with a note when resizing it to `size` (its context size) stretches it: the context is
    resized without a crop, as diffusers' Kontext pipeline does. FLUX.1 Kontext's preferred sizes span 3:7 to 7:3, so
    a photo moves a few percent; demo-kontext has only 64x64, and a 300x200 drawing of a circle became an oval
    that the demo often failed to edit (2026-12-07). Above 5% the result says so and how to keep the proportions."""
    (width, height), (to_width, to_height) = edit.size, size
    if abs((width / height) / (to_width / to_height) - 1) <= 0.05:
        return edit
    note = (f"resized from {width}x{height} to {to_width}x{to_height}, the nearest size {spec.id} edits at, which "
            f"stretches it; crop it to the proportions of {to_width}x{to_height} first to keep its shapes")
    return replace(edit, notes=(*edit.notes, note))


def _edit_input(req: GenerationRequest, spec: ModelSpec, prompt: str) -> "InputImage | None":
    """For a model that edits its input image (ImageUse.CONTEXT): the image, read and checked, after the
    request's other image fields are checked against an edit's; None for every other model."""
    from .families import family_of
    from .families.family import ImageUse
    from .image_input import read_image

    if family_of(spec).image_use is not ImageUse.CONTEXT:
        return None
    if req.image is None:
        raise RequestError(f"{spec.id} edits an image: give it an input image and an instruction saying what to change.")
    if not prompt.strip():
        raise RequestError("The instruction is empty: say what to change in the image, e.g. \"make the sky red\".")
    if req.strength is not None:
        raise RequestError(f"{spec.id} takes no strength (an edit always runs every step, guided by the whole input "
                           "image); clear strength.")
    if req.mask is not None or req.only_masked:
        raise RequestError(f"{spec.id} takes no mask (the instruction says what to change); clear the mask.")
    return read_image(req.image)


def check_prompt(name: str, text: Any) -> None:
    """Raise RequestError unless `text` is a string within the caps that encodes as UTF-8."""
    if not isinstance(text, str):
        raise RequestError(f"The {name} must be text.")
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(f"The {name} is {len(text):,} characters long; the limit is {MAX_PROMPT_CHARS:,} "
                           f"characters ({MAX_PROMPT_BYTES:,} bytes of UTF-8). Shorten it.")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate half, e.g. from a JSON "\ud800" escape
        raise RequestError(f"The {name} contains an invalid character at position {exc.start + 1} (half of a "
                           "UTF-16 surrogate pair); remove it or paste the text again.") from None
    if size > MAX_PROMPT_BYTES:
        raise RequestError(f"The {name} is {size:,} bytes long in UTF-8; the limit is {MAX_PROMPT_BYTES:,} bytes "
                           f"({MAX_PROMPT_CHARS:,} characters). Shorten it.")
    # Control characters (NUL from a JSON "\u0000", ESC, ...) mean nothing to a text encoder, and NUL cannot be
    # kept in the PNG's text metadata (PNG text chunks end at it), so the saved settings would lose the rest.
    control = next((i for i, ch in enumerate(text) if ch not in "\t\n\r" and (ch < " " or ch == "\x7f")), None)
    if control is not None:
        raise RequestError(f"The {name} contains a control character (U+{ord(text[control]):04X}) at position "
                           f"{control + 1}; remove it.")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RequestError(f"{name} must be a whole number; got {value!r}.")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise RequestError(f"{name} must be a whole number; got {value!r}.") from None


def _as_float(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number; got {value!r}.") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise RequestError(f"{name} must be a finite number; got {value!r}.")
    return out
