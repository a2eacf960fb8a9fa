"""LoRA files: find them, read them through diffusers' own converters, check them against a model.

A LoRA file becomes a `LoraFile`: per component (transformer / unet / text encoders) and per layer, a
low-rank pair (down, up) and its alpha. Backends fuse `scale * alpha/rank * up @ down` into the 16-bit
weights (pipelines/backends/torch_lora.py), so the denoising step costs the same with a LoRA as without.

Layouts: diffusers/PEFT, kohya/Automatic1111 (`lora_unet_...`, `lora_te1_...`), and for Flux the BFL and
XLabs layouts: `FluxPipeline.lora_state_dict` / `StableDiffusionXLPipeline.lora_state_dict` recognise and
convert them (diffusers.loaders.lora_conversion_utils); the older diffusers key names those return for
SDXL are turned into PEFT names by diffusers.utils.state_dict_utils, as `load_lora_weights` does.

Everything here runs before any model work: an unknown name, a scale out of range, a LoRA for the other
family or another model size, a truncated file: each is a one-line `LoraError` that says what to change.
"""
from __future__ import annotations

import functools
import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .components import weight_shapes
from .config import DEFAULT_LORA_DIR
from .families import FAMILIES
from .registry import Family, ModelSpec
from .request import RequestError

MIN_SCALE, MAX_SCALE = -4.0, 4.0  # wider than any LoRA is used at; beyond it images are noise
MAX_LORAS = 8
# Automatic1111's prompt syntax: <lora:NAME> or <lora:NAME:SCALE> (the scale defaults to 1).
PROMPT_TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>")

# Raw key fragments that say which family a file was trained for (before any conversion).
_FAMILY_HINTS = {
    Family.FLUX: ("double_blocks", "single_blocks", "single_transformer_blocks", "transformer.", "lora_transformer_",
                  "diffusion_model.", "context_embedder", "x_embedder"),
    Family.SDXL: ("unet.", "lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "lora_unet_input_blocks",
                  "lora_unet_output_blocks", "lora_unet_middle_block", "lora_te2_", "down_blocks.", "up_blocks."),
}


class LoraError(RequestError):
    """A LoRA cannot be used as asked; the message names it and says what to change."""


@dataclass(frozen=True)
class LowRank:
    """One layer's update: delta W = alpha/rank * up @ down (up: (out, r), down: (r, in[, kh, kw]))."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None  # None: alpha = rank (diffusers' default; kohya Flux files come with it folded in)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float, device: torch.device | str) -> torch.Tensor:
        """scale * alpha/rank * up @ down in fp32, shaped like the layer's weight."""
        factor = scale * (self.alpha / self.rank if self.alpha is not None else 1.0)
        down = self.down.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32)
        out = (up.flatten(1) @ down.flatten(1)) * factor
        if down.dim() == 4:  # a conv LoRA (kohya LoCon): (out, in, kh, kw)
            out = out.reshape(up.shape[0], *down.shape[1:])
        return out

    def weight_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class LoraFile:
    name: str  # the file's stem: what prompts, PNGs and the UI call it
    digest: str  # Automatic1111's short hash (first 12 hex of the sha256 of the tensor data)
    family: Family
    layers: Mapping[str, Mapping[str, LowRank]]  # component -> layer path -> update


@dataclass(frozen=True)
class AppliedLora:
    file: LoraFile
    scale: float


@dataclass(frozen=True)
class LoraSet:
    """The LoRAs one job runs with, in the order given (fusing adds, so the order does not change the result)."""

    items: tuple[AppliedLora, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.items)

    def key(self, component: str | None = None) -> tuple[tuple[str, float], ...]:
        """What identifies the fused weights (of one component): each file's digest and scale."""
        return tuple((a.file.digest, a.scale) for a in self.items
                     if component is None or component in a.file.layers)

    def digest(self, component: str | None = None) -> str:
        """A short stable name of `key` (engine files are keyed by it)."""
        key = self.key(component)
        return hashlib.sha256(repr(key).encode()).hexdigest()[:12] if key else ""

    def touches(self, component: str) -> bool:
        return any(component in a.file.layers for a in self.items)

    def layers(self, component: str) -> dict[str, list[tuple[LowRank, float]]]:
        """Layer path -> the (update, scale) pairs every LoRA of the set adds to it."""
        out: dict[str, list[tuple[LowRank, float]]] = {}
        for applied in self.items:
            for path, lr in applied.file.layers.get(component, {}).items():
                out.setdefault(path, []).append((lr, applied.scale))
        return out

    def hashes(self) -> tuple[tuple[str, str], ...]:
        return tuple((a.file.name, a.file.digest) for a in self.items)


NO_LORAS = LoraSet()


# ---------------------------------------------------------------------- names, scales and the prompt syntax

def parse_prompt(prompt: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """Split Automatic1111's `<lora:NAME:SCALE>` tags out of a prompt: (the text the encoders see, the LoRAs)."""
    found = tuple((m.group(1).strip(), _scale(m.group(1).strip(), m.group(2))) for m in PROMPT_TAG.finditer(prompt))
    text = re.sub(r"\s+([,.;])", r"\1", re.sub(r"\s{2,}", " ", PROMPT_TAG.sub("", prompt)))
    text = text.strip().strip(",").strip()
    return text, found


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`PATH_OR_NAME[:SCALE]` (the CLI's --lora) -> (name or path, scale)."""
    head, sep, tail = text.rpartition(":")
    if sep and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)\s*", tail):
        return head, _scale(head, tail)
    return text, 1.0


def _scale(name: str, text: str | None) -> float:
    if text is None or not text.strip():
        return 1.0
    try:
        return float(text)
    except ValueError:
        raise LoraError(f"LoRA {name}: the scale {text!r} is not a number; write e.g. <lora:{name}:0.8>.") from None


def check_loras(loras: Iterable) -> tuple[tuple[str, float], ...]:
    """The request's LoRAs as (name, scale) pairs, each name once, every scale in range."""
    out: list[tuple[str, float]] = []
    for item in loras:
        try:
            name, scale = item
        except (TypeError, ValueError):
            raise LoraError(f"Each LoRA is a (name, scale) pair; got {item!r}.") from None
        if not isinstance(name, str) or not name.strip():
            raise LoraError(f"A LoRA name must be text; got {name!r}.")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise LoraError(f"LoRA {name}: the scale must be a number; got {scale!r}.") from None
        if not MIN_SCALE <= scale <= MAX_SCALE:  # also refuses NaN
            raise LoraError(f"LoRA {name}: scale {scale:g} is outside {MIN_SCALE:g}..{MAX_SCALE:g}; "
                            "most LoRAs are used between 0.5 and 1.")
        if any(n == name.strip() for n, _ in out):
            raise LoraError(f"LoRA {name} is given twice; give it once with the scale you want.")
        out.append((name.strip(), scale))
    if len(out) > MAX_LORAS:
        raise LoraError(f"At most {MAX_LORAS} LoRAs at once; {len(out)} were given.")
    return tuple(out)


# ---------------------------------------------------------------------- the loras/ folder

@dataclass(frozen=True)
class LoraLibrary:
    """The `loras/` folder (--lora-dir): every .safetensors under it, by file stem."""

    folder: Path = DEFAULT_LORA_DIR
    allow_paths: bool = False  # names may also be paths to .safetensors files (the CLI only)

    def names(self) -> list[str]:
        return sorted(self._files())

    def _files(self) -> dict[str, Path]:
        if not self.folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.folder.rglob("*.safetensors")) if p.is_file()}

    def path_of(self, name: str) -> Path:
        """A name in the folder, or (the CLI, `allow_paths`) a path to a .safetensors file."""
        files = self._files()
        if name in files:
            return files[name]
        path = Path(name).expanduser()
        if self.allow_paths and path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
            raise LoraError(f"LoRA {path.name}: only .safetensors files are loaded (pickle files can run code); "
                            "convert it or download the .safetensors version.")
        if self.allow_paths and path.suffix.lower() == ".safetensors" and path.is_file():
            return path
        known = ", ".join(files) if files else f"none: put .safetensors files in {self.folder.name}/"
        raise LoraError(f"Unknown LoRA {path.name!r}; available LoRAs: {known}.")


# ---------------------------------------------------------------------- reading and checking a file

def tensor_data_sha256(path: Path) -> str:
    """sha256 of a safetensors file's tensor data (its header skipped): Automatic1111's and Civitai's LoRA hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = f.read(8)
        if len(header) < 8:
            raise ValueError("shorter than a safetensors header")
        f.seek(8 + struct.unpack("<Q", header)[0])
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_lora(path: Path, spec: ModelSpec) -> LoraFile:
    stat = path.stat()
    return _read_lora(path.resolve(), stat.st_mtime_ns, stat.st_size, spec.family)


@functools.lru_cache(maxsize=16)  # keyed by modification time and size: an edited file is read again
def _read_lora(path: Path, mtime_ns: int, size: int, family: Family) -> LoraFile:
    from safetensors import safe_open

    name = path.stem
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_keys = list(f.keys())
            for key in raw_keys:  # reading every tensor finds a file cut short
                f.get_slice(key)
        digest = tensor_data_sha256(path)[:12]
    except Exception as exc:
        raise LoraError(f"LoRA {name}: not a readable .safetensors file (truncated or corrupt: "
                        f"{type(exc).__name__}); download it again.") from None
    made_for = _guess_family(raw_keys)
    if made_for is not None and made_for is not family:
        raise LoraError(f"LoRA {name} was made for {made_for.label}, not {family.label}; choose a {family.label} LoRA.")
    layers = _convert(path, name, family)
    if not layers:
        raise LoraError(f"LoRA {name}: no LoRA layers found for {family.label} (is it a LoRA file?).")
    return LoraFile(name, digest, family, layers)


def _guess_family(keys: list[str]) -> Family | None:
    votes = {fam: sum(any(h in k for h in hints) for k in keys) for fam, hints in _FAMILY_HINTS.items()}
    best = max(votes, key=votes.get)
    return best if votes[best] > 0 and list(votes.values()).count(votes[best]) == 1 else None


def _convert(path: Path, name: str, family: Family) -> dict[str, dict[str, LowRank]]:
    """component -> layer -> LowRank, through the family pipeline's own `lora_state_dict`."""
    import diffusers
    from diffusers.utils.state_dict_utils import (StateDictType, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    fam = FAMILIES[family]
    reader = getattr(diffusers, fam.lora_reader)
    try:
        if family is Family.FLUX:
            state, alphas = reader.lora_state_dict(str(path), return_alphas=True)
        else:
            state, alphas = reader.lora_state_dict(str(path))
    except Exception as exc:
        raise LoraError(f"LoRA {name}: diffusers cannot read it as a {family.label} LoRA "
                        f"({type(exc).__name__}); check it was made for {family.label}.") from None
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in (alphas or {}).items()}
    out: dict[str, dict[str, LowRank]] = {}
    for component in fam.lora_components:
        prefix = component + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        part_alphas = {k[len(prefix):]: torch.tensor(v) for k, v in alphas.items() if k.startswith(prefix)}
        if not part:
            continue
        if not any(".lora_A." in k for k in part):  # older diffusers names -> PEFT names, as load_lora_weights does
            if component == "unet":
                part, part_alphas = convert_unet_state_dict_to_peft(part), convert_unet_state_dict_to_peft(part_alphas)
            else:
                # Name the old layout outright: diffusers infers it only when an out-projection is present.
                kind = (StateDictType.DIFFUSERS if any(".lora_linear_layer." in k for k in part)
                        else StateDictType.DIFFUSERS_OLD)
                part = convert_state_dict_to_peft(part, original_type=kind)
                part_alphas = convert_state_dict_to_peft(part_alphas, original_type=kind)
        layers = {}
        for key, down in part.items():
            if not key.endswith(".lora_A.weight"):
                if not key.endswith(".lora_B.weight"):
                    raise LoraError(f"LoRA {name}: entry {key} is not a plain LoRA layer (DoRA, LoKr and biases "
                                    "are not supported); use a plain LoRA.")
                continue
            layer = key.removesuffix(".lora_A.weight")
            up = part.get(layer + ".lora_B.weight")
            if up is None:
                raise LoraError(f"LoRA {name}: layer {layer} has a down matrix but no up matrix; the file is incomplete.")
            alpha = part_alphas.get(key, part_alphas.get(layer))  # old names carry it per matrix, PEFT per layer
            layers[layer] = LowRank(down, up, None if alpha is None else float(alpha))
        out[component] = layers
    return out


def check_against(lora: LoraFile, spec: ModelSpec) -> None:
    """Every layer the LoRA changes exists in `spec`'s architecture with the shape the LoRA expects."""
    for component, layers in lora.layers.items():
        shapes = weight_shapes(spec, component)
        missing, wrong = [], []
        for layer, lr in layers.items():
            found = model_layer(layer, shapes)
            if found is None:
                missing.append(layer)
            elif tuple(shapes[found]) != lr.weight_shape():
                wrong.append((layer, shapes[found], lr.weight_shape()))
        if wrong:
            layer, want, got = wrong[0]
            raise LoraError(f"LoRA {lora.name} does not fit {spec.id} (made for another model size?): layer {layer} "
                            f"is {tuple(want)} in the model but {tuple(got)} in the LoRA; choose a LoRA for {spec.id}.")
        if missing:
            raise LoraError(f"LoRA {lora.name} does not fit {spec.id}: {len(missing)} of its {component} layers are not "
                            f"in the model (e.g. {missing[0]}); choose a LoRA for {spec.id}.")


def model_layer(layer: str, names: Mapping[str, object] | Iterable[str]) -> str | None:
    """The model's name for a LoRA's layer: CLIP text models are flat in recent transformers, while LoRA
    files may still say `text_model.` (diffusers strips it the same way)."""
    for candidate in (layer, layer.removeprefix("text_model."), "text_model." + layer):
        if candidate in names:
            return candidate
    return None


def load_set(loras: Iterable[tuple[str, float]], spec: ModelSpec, library: LoraLibrary) -> LoraSet:
    """The request's LoRAs read, converted and checked against `spec`: a one-line LoraError before model work."""
    items = []
    loras = check_loras(loras)
    if loras and not FAMILIES[spec.family].lora_reader:
        raise LoraError(f"{spec.id} takes no LoRAs yet ({spec.family.label} LoRAs are not supported); "
                        "clear the LoRA rows and any <lora:...> in the prompt.")
    for name, scale in loras:
        lora = read_lora(library.path_of(name), spec)
        check_against(lora, spec)
        items.append(AppliedLora(lora, scale))
    return LoraSet(tuple(items))
