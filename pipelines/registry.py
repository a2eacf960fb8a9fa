"""The models Prism knows: one frozen ModelSpec per model, with defaults, limits and full architectures.

Every component's architecture config is written out here so that a full-size model can be built
with random weights and no download (benchmarks on machines that cannot reach the Hub). The configs
are those published in each repository's `*/config.json`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS_DIR = REPO_ROOT / "models"


class Family(str, Enum):
    FLUX = "flux"
    SDXL = "sdxl"
    KONTEXT = "kontext"  # FLUX.1 Kontext: a Flux transformer that edits an input image by instruction

    @property
    def label(self) -> str:
        """The name people know the family by (its tab in the app)."""
        return {"flux": "Flux.1", "sdxl": "SDXL", "kontext": "FLUX.1 Kontext"}[self.value]


# model_index.json `_class_name` -> family; how a local Hugging Face-layout folder says what it is.
PIPELINE_CLASS_FAMILY = {
    "FluxPipeline": Family.FLUX,
    "StableDiffusionXLPipeline": Family.SDXL,
    "StableDiffusionXLImg2ImgPipeline": Family.SDXL,  # how the SDXL refiner's folder names itself
    "FluxKontextPipeline": Family.KONTEXT,
}

# The sizes FLUX.1 Kontext was trained at (width, height): an input image is resized to the one nearest its
# aspect ratio (diffusers' PREFERRED_KONTEXT_RESOLUTIONS, from BFL's reference code; a test keeps them equal).
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


@dataclass(frozen=True)
class ComponentSpec:
    """One entry of a Hugging Face pipeline folder: where the class comes from and its architecture."""

    library: str  # "diffusers" | "transformers"
    class_name: str
    config: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class SizeLimits:
    multiple_of: int
    min_side: int
    max_side: int

    def check(self, width: int, height: int) -> str | None:
        """None when the size is valid, else what to change."""
        for name, value in (("width", width), ("height", height)):
            if value % self.multiple_of:
                lo = value - value % self.multiple_of
                near = sorted({min(max(v, self.min_side), self.max_side) for v in (lo, lo + self.multiple_of)})
                return (f"{name} {value} is not a multiple of {self.multiple_of}; "
                        f"use {' or '.join(str(v) for v in near)}.")
            if not self.min_side <= value <= self.max_side:
                return f"{name} {value} is outside {self.min_side}..{self.max_side}; choose a size in that range."
        return None

    def keeping_shape(self, size: tuple[int, int], area: int) -> tuple[int, int]:
        """The valid (width, height) nearest `size`'s aspect ratio with about `area` pixels: what an input image
        of `size` becomes when no output size is given (a landscape photo stays landscape)."""
        scale = (area / (size[0] * size[1])) ** 0.5
        m = self.multiple_of

        def sides(v: float) -> set[int]:  # the valid sides on either side of v
            return {min(max(k * m, self.min_side), self.max_side) for k in (int(v // m), int(v // m) + 1)}

        def miss(wh: tuple[int, int]) -> float:  # the aspect ratio first, then the area
            return abs(math.log(wh[0] * size[1] / (wh[1] * size[0]))) + 0.5 * abs(math.log(wh[0] * wh[1] / area))

        # Rounding each side alone bent small sizes: 4000x3000 became 80x48 at demo-flux's 64x64, not 64x48.
        candidates = [(w, h) for w in sides(size[0] * scale) for h in sides(size[1] * scale)]
        return min(candidates, key=lambda wh: (miss(wh), wh))


@dataclass(frozen=True)
class ModelSpec:
    id: str
    family: Family
    description: str
    components: Mapping[str, ComponentSpec] = field(hash=False)
    repo: str | None = None  # Hugging Face repo id
    local_dir: Path | None = None  # a folder in the Hugging Face pipeline layout
    revision: str | None = None
    gated: bool = False
    default_steps: int = 28
    default_guidance: float = 3.5
    default_width: int = 1024
    default_height: int = 1024
    max_steps: int = 100
    max_guidance: float = 30.0
    max_images: int = 8
    size: SizeLimits = SizeLimits(16, 256, 2048)
    max_prompt_tokens: int = 77
    supports_negative_prompt: bool = False
    # The SDXL refiner pairing. A base names the model that can finish its images (a registry id, or a folder
    # given absolute or beside the base's own); a refiner is conditioned on an aesthetic score (diffusers'
    # `requires_aesthetics_score`) and runs only after a base's first steps, so it is never a model of its own.
    refiner: str | None = None
    is_refiner: bool = False
    # A refiner reached through its base (`refiner_of`): the base's registry id or folder, so what a refiner alone
    # cannot do (calibrating FP8/FP4 engines over real trajectories) can run the pair.
    base: str | None = None
    # Edit models: the (width, height) sizes an input image is resized to, the one nearest its aspect ratio.
    preferred_sizes: tuple[tuple[int, int], ...] = ()
    # A closed vocabulary (the embedded demo models, trained on a few dozen words): a prompt's other words steer
    # nothing the model learned, and the result says which they were (pipelines.vocabulary). Empty: any words.
    vocabulary: frozenset[str] = frozenset()
    # A closed sentence form (pipelines.vocabulary.GRAMMARS, e.g. "demo-shapes"): looser prompts are completed to
    # it before they are drawn. Empty: prompts are drawn as given.
    prompt_grammar: str = ""

    @property
    def license_url(self) -> str | None:
        return f"https://huggingface.co/{self.repo}" if self.repo else None

    @property
    def source(self) -> str:
        return str(self.local_dir) if self.local_dir else (self.repo or "(built in)")

    @property
    def denoiser(self) -> str:
        from .families import family_of  # the family modules import this one

        return family_of(self).denoiser

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.components["vae"].config["block_out_channels"]) - 1)


# --------------------------------------------------------------------------- architectures

CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower, as shipped in the Flux and SDXL repos
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
CLIP_BIGG_TEXT = {  # laion OpenCLIP ViT-bigG/14 text tower (SDXL text_encoder_2)
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
    "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
T5_XXL_ENCODER = {  # google/t5-v1_1-xxl encoder (Flux text_encoder_2)
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "num_decoder_layers": 24,
    "vocab_size": 32128, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1,
    "is_encoder_decoder": True, "tie_word_embeddings": False,
}
FLUX_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "out_channels": 3,
    "latent_channels": 16, "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_eps": 1e-5,
    "norm_num_groups": 32, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
}
SDXL_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "out_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024,
    "scaling_factor": 0.13025,
}
# stabilityai/stable-diffusion-xl-refiner-1.0 `unet/config.json` (diffusers' conversion of Stability's
# sd_xl_refiner.yaml: model_channels 384, channel_mult [1, 2, 4, 4], attention at the middle two levels,
# transformer_depth 4, 64-channel heads, context_dim 1280, adm_in_channels 2560 = 1280 pooled + 5 x 256 for
# the size, crop and aesthetic-score ids): 2.26 B parameters, 4.52 GB in fp16 as shipped.
SDXL_REFINER_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_eps": 1e-5,
    "norm_num_groups": 32, "projection_class_embeddings_input_dim": 2560, "sample_size": 128,
    "transformer_layers_per_block": 4, "use_linear_projection": True,
}
FLOW_MATCH_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                  "base_shift": 0.5, "max_shift": 1.15}
FLOW_MATCH_SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                      "use_dynamic_shifting": False}
EULER_SDXL = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
              "use_karras_sigmas": False}
EULER_A_TURBO = {"_class_name": "EulerAncestralDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                 "steps_offset": 1, "timestep_spacing": "trailing"}


def _flux_components(guidance_embeds: bool, t5_max_length: int) -> dict[str, ComponentSpec]:
    return {
        "scheduler": ComponentSpec("diffusers", "FlowMatchEulerDiscreteScheduler",
                                   FLOW_MATCH_DEV if guidance_embeds else FLOW_MATCH_SCHNELL),
        "text_encoder": ComponentSpec("transformers", "CLIPTextModel", CLIP_L_TEXT),
        "text_encoder_2": ComponentSpec("transformers", "T5EncoderModel", T5_XXL_ENCODER),
        "tokenizer": ComponentSpec("transformers", "CLIPTokenizer", {"model_max_length": 77, "vocab_size": 49408}),
        "tokenizer_2": ComponentSpec("transformers", "T5TokenizerFast",
                                     {"model_max_length": t5_max_length, "vocab_size": 32128}),
        "transformer": ComponentSpec("diffusers", "FluxTransformer2DModel",
                                     {**FLUX_TRANSFORMER, "guidance_embeds": guidance_embeds}),
        "vae": ComponentSpec("diffusers", "AutoencoderKL", FLUX_VAE),
    }


def _sdxl_components(scheduler: dict, unet_sample_size: int) -> dict[str, ComponentSpec]:
    return {
        "scheduler": ComponentSpec("diffusers", scheduler["_class_name"], scheduler),
        "text_encoder": ComponentSpec("transformers", "CLIPTextModel", CLIP_L_TEXT),
        "text_encoder_2": ComponentSpec("transformers", "CLIPTextModelWithProjection", CLIP_BIGG_TEXT),
        "tokenizer": ComponentSpec("transformers", "CLIPTokenizer", {"model_max_length": 77, "vocab_size": 49408}),
        "tokenizer_2": ComponentSpec("transformers", "CLIPTokenizer", {"model_max_length": 77, "vocab_size": 49408}),
        "unet": ComponentSpec("diffusers", "UNet2DConditionModel", {**SDXL_UNET, "sample_size": unet_sample_size}),
        "vae": ComponentSpec("diffusers", "AutoencoderKL", SDXL_VAE),
    }


def _sdxl_refiner_components() -> dict[str, ComponentSpec]:
    """The refiner repo's model_index.json: no `text_encoder`/`tokenizer` (null there), the base's OpenCLIP-bigG
    encoder and VAE (the same weights: diffusers' docs pass the base's `text_encoder_2` and `vae` to it), its own UNet
    and the base's scheduler config."""
    return {
        "scheduler": ComponentSpec("diffusers", "EulerDiscreteScheduler", EULER_SDXL),
        "text_encoder_2": ComponentSpec("transformers", "CLIPTextModelWithProjection", CLIP_BIGG_TEXT),
        "tokenizer_2": ComponentSpec("transformers", "CLIPTokenizer", {"model_max_length": 77, "vocab_size": 49408}),
        "unet": ComponentSpec("diffusers", "UNet2DConditionModel", SDXL_REFINER_UNET),
        "vae": ComponentSpec("diffusers", "AutoencoderKL", SDXL_VAE),
    }


FLUX_DEFAULTS = dict(family=Family.FLUX, size=SizeLimits(16, 256, 2048), supports_negative_prompt=False)
SDXL_DEFAULTS = dict(family=Family.SDXL, size=SizeLimits(8, 256, 2048), max_prompt_tokens=77)
KONTEXT_DEFAULTS = {**FLUX_DEFAULTS, "family": Family.KONTEXT}

HUB_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(id="flux.1-dev", repo="black-forest-labs/FLUX.1-dev", gated=True,
              description="FLUX.1 [dev]: 12B guidance-distilled transformer, best quality (non-commercial license).",
              components=_flux_components(True, 512), default_steps=28, default_guidance=3.5,
              max_prompt_tokens=512, **FLUX_DEFAULTS),
    ModelSpec(id="flux.1-schnell", repo="black-forest-labs/FLUX.1-schnell",
              description="FLUX.1 [schnell]: 12B timestep-distilled transformer, 1-4 steps (Apache-2.0).",
              components=_flux_components(False, 256), default_steps=4, default_guidance=0.0,
              max_prompt_tokens=256, **FLUX_DEFAULTS),
    # Kontext's components are FLUX.1-dev's architecture (guidance-distilled transformer, CLIP-L, T5-XXL, the
    # same VAE); what differs is the loop: the input image's tokens ride along with the noise tokens.
    ModelSpec(id="flux.1-kontext-dev", repo="black-forest-labs/FLUX.1-Kontext-dev", gated=True,
              description="FLUX.1 Kontext [dev]: 12B editing transformer, changes an input image by an instruction "
                          "(non-commercial license).",
              components=_flux_components(True, 512), default_steps=28, default_guidance=2.5,
              max_prompt_tokens=512, preferred_sizes=PREFERRED_KONTEXT_RESOLUTIONS, **KONTEXT_DEFAULTS),
    ModelSpec(id="sdxl-base-1.0", repo="stabilityai/stable-diffusion-xl-base-1.0",
              description="Stable Diffusion XL base 1.0: 2.6B UNet with classifier-free guidance.",
              components=_sdxl_components(EULER_SDXL, 128), default_steps=30, default_guidance=5.0,
              supports_negative_prompt=True, refiner="sdxl-refiner-1.0", **SDXL_DEFAULTS),
    ModelSpec(id="sdxl-turbo", repo="stabilityai/sdxl-turbo",
              description="SDXL Turbo: adversarially distilled SDXL, 1-4 steps at 512x512 without guidance.",
              components=_sdxl_components(EULER_A_TURBO, 64), default_steps=1, default_guidance=0.0,
              default_width=512, default_height=512, supports_negative_prompt=False, **SDXL_DEFAULTS),
)

# Refiners finish a base model's images and are not offered as models of their own (menus list HUB_MODELS).
REFINER_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(id="sdxl-refiner-1.0", repo="stabilityai/stable-diffusion-xl-refiner-1.0", is_refiner=True,
              description="Stable Diffusion XL refiner 1.0: 2.3B UNet that finishes sdxl-base-1.0's last steps.",
              components=_sdxl_refiner_components(), default_steps=30, default_guidance=5.0,
              supports_negative_prompt=True, **SDXL_DEFAULTS),
)


# --------------------------------------------------------------------------- local folders

SPEC_OVERRIDES_FILE = "prism.json"  # optional, beside model_index.json: defaults and limits for that folder


class UnknownModelError(ValueError):
    pass


def read_local_spec(folder: Path, model_id: str | None = None) -> ModelSpec:
    """A ModelSpec for a folder in the Hugging Face pipeline layout (family read from model_index.json)."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise UnknownModelError(f"{folder} has no model_index.json; point --model at a folder in the Hugging Face "
                                "pipeline layout (model_index.json, transformer/ or unet/, vae/, text_encoder/, ...).")
    index = json.loads(index_path.read_text())
    class_name = index.get("_class_name", "")
    if class_name not in PIPELINE_CLASS_FAMILY:
        known = ", ".join(PIPELINE_CLASS_FAMILY)
        raise UnknownModelError(f"{folder}: pipeline class {class_name!r} is not supported; Prism runs {known}.")
    family = PIPELINE_CLASS_FAMILY[class_name]

    components: dict[str, ComponentSpec] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, cls = entry
        config = _read_component_config(folder / name)
        components[name] = ComponentSpec(library, cls, config)

    base = {Family.FLUX: FLUX_DEFAULTS, Family.SDXL: SDXL_DEFAULTS, Family.KONTEXT: KONTEXT_DEFAULTS}[family]
    spec = ModelSpec(id=model_id or folder.name, local_dir=folder, components=components,
                     description=f"Local {class_name} from {folder}",
                     is_refiner=bool(index.get("requires_aesthetics_score", False)), **base)
    guided = components.get("transformer", ComponentSpec("", "")).config.get("guidance_embeds", True)
    if family is Family.FLUX and not guided:
        spec = replace(spec, default_steps=4, default_guidance=0.0, max_prompt_tokens=256)
    elif family is Family.FLUX:
        spec = replace(spec, max_prompt_tokens=512)
    elif family is Family.KONTEXT:
        spec = replace(spec, max_prompt_tokens=512, default_guidance=2.5 if guided else 0.0)
    else:
        spec = replace(spec, default_steps=30, default_guidance=5.0, supports_negative_prompt=True)
    spec = _apply_overrides(spec, folder / SPEC_OVERRIDES_FILE)
    if family is Family.KONTEXT and not spec.preferred_sizes:
        spec = replace(spec, preferred_sizes=_kontext_sizes(spec))
    return spec


def _kontext_sizes(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    """A Kontext folder at the real model's native 1024x1024 takes its inputs at Kontext's trained sizes; a
    smaller one (the embedded demo, trained on 64x64 pictures only) at its own default size."""
    if (spec.default_width, spec.default_height) == (1024, 1024):
        return PREFERRED_KONTEXT_RESOLUTIONS
    return ((spec.default_width, spec.default_height),)


def _read_component_config(sub: Path) -> dict[str, Any]:
    for candidate in ("config.json", "scheduler_config.json", "tokenizer_config.json"):
        if (sub / candidate).is_file():
            return json.loads((sub / candidate).read_text())
    return {}


def _apply_overrides(spec: ModelSpec, path: Path) -> ModelSpec:
    if not path.is_file():
        return spec
    raw = json.loads(path.read_text())
    if "size" in raw:
        raw["size"] = SizeLimits(**raw["size"])
    if "preferred_sizes" in raw:
        raw["preferred_sizes"] = tuple((int(w), int(h)) for w, h in raw["preferred_sizes"])
    if "vocabulary" in raw:
        if not isinstance(raw["vocabulary"], list) or not all(isinstance(w, str) for w in raw["vocabulary"]):
            raise UnknownModelError(f"{path}: \"vocabulary\" must be a list of words, e.g. [\"red\", \"circle\"]")
        raw["vocabulary"] = frozenset(word.lower() for word in raw["vocabulary"])
    if "prompt_grammar" in raw:
        from .vocabulary import GRAMMARS  # it imports this module

        if not isinstance(raw["prompt_grammar"], str) or raw["prompt_grammar"] not in GRAMMARS:
            raise UnknownModelError(f"{path}: \"prompt_grammar\" must be one of {sorted(GRAMMARS)}; "
                                    f"got {raw['prompt_grammar']!r}")
    allowed = {f for f in ModelSpec.__dataclass_fields__} - {"components", "family", "local_dir", "id", "base"}
    unknown = set(raw) - allowed
    if unknown:
        raise UnknownModelError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return replace(spec, **raw)


def demo_specs(models_dir: Path = DEMO_MODELS_DIR) -> tuple[ModelSpec, ...]:
    """The embedded demo models that ship in the repository, when their weights are present."""
    specs = []
    for name in ("demo-flux", "demo-sdxl", "demo-kontext"):  # demo-kontext: when its trained weights have landed
        folder = models_dir / name
        if (folder / "model_index.json").is_file():
            specs.append(read_local_spec(folder, model_id=name))
    return tuple(specs)


def known_ids() -> list[str]:
    return [s.id for s in HUB_MODELS] + [s.id for s in demo_specs()]


def resolve_spec(model: str) -> ModelSpec:
    """A registry id, or a local folder in the Hugging Face pipeline layout."""
    model = str(model).strip()
    for spec in HUB_MODELS + REFINER_MODELS + demo_specs():
        if spec.id == model:
            return spec
    path = Path(model).expanduser()
    if path.is_dir():
        return read_local_spec(path.resolve())
    raise UnknownModelError(f"Unknown model {model!r}. Choose one of: {', '.join(known_ids())}, "
                            "or give a local folder in the Hugging Face pipeline layout.")


def refiner_of(spec: ModelSpec) -> ModelSpec | None:
    """The refiner `spec` names (None when it has none). Raises UnknownModelError when the named refiner is not
    one, or does not share the base's `text_encoder_2` and VAE (a job loads those once, from the base)."""
    if spec.refiner is None:
        return None
    refiner = next((r for r in REFINER_MODELS if r.id == spec.refiner), None)
    if refiner is None:
        folder = Path(spec.refiner).expanduser()
        if not folder.is_absolute() and spec.local_dir is not None:
            folder = spec.local_dir.parent / folder
        refiner = read_local_spec(folder.resolve())
    if not refiner.is_refiner or refiner.family is not spec.family:
        raise UnknownModelError(f"{spec.id} names {spec.refiner!r} as its refiner, but that is not an SDXL refiner "
                                "(its model_index.json must say requires_aesthetics_score); fix the refiner entry.")
    for shared in ("text_encoder_2", "vae"):
        ours, theirs = (_architecture_of(s.components.get(shared)) for s in (spec, refiner))
        common = set(ours) & set(theirs)
        if ours.get("class") != theirs.get("class") or any(ours[k] != theirs[k] for k in common):
            raise UnknownModelError(f"{refiner.id}'s {shared} differs from {spec.id}'s; a refiner must share the base's "
                                    f"{shared}. Pair {spec.id} with a refiner made for it.")
    return replace(refiner, base=str(spec.local_dir) if spec.local_dir else spec.id)


def base_of(refiner: ModelSpec) -> ModelSpec | None:
    """The base a refiner finishes: the one it was reached through, else the registry's model that names it."""
    if refiner.base is not None:
        return resolve_spec(refiner.base)
    return next((s for s in HUB_MODELS if s.refiner == refiner.id), None)


# Config-file keys that say how a file was written, not what the component is.
_BOOKKEEPING = {"architectures", "transformers_version", "torch_dtype", "dtype"}


def _architecture_of(component: ComponentSpec | None) -> dict[str, Any]:
    """A component's class and architecture (the registry writes a subset of a config file's keys)."""
    if component is None:
        return {}
    return {"class": component.class_name, **{k: v for k, v in component.config.items()
                                              if not k.startswith("_") and k not in _BOOKKEEPING}}
