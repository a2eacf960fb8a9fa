"""Loading components the way a user's machine does: Hub repo id (token, cache, offline mode), a local
folder in the Hugging Face layout, or the exact architecture with random weights for benchmarks.

Hub failures become ModelAccessError, whose message says what to do (accept a license, log in,
go online, or point --model at a local copy).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .registry import Family, ModelSpec
from .text_tokenizers import BASIC_WORDS, build_clip_tokenizer, build_t5_tokenizer


class ModelAccessError(RuntimeError):
    """The weights cannot be had. The message says what the user can do about it."""


@dataclass(frozen=True)
class HubOptions:
    token: str | None = None  # None: HF_TOKEN, else the `hf auth login` cache (huggingface_hub reads both)
    offline: bool | None = None  # None: follow HF_HUB_OFFLINE
    cache_dir: str | None = None  # None: HF_HUB_CACHE / HF_HOME

    @property
    def is_offline(self) -> bool:
        if self.offline is not None:
            return self.offline
        return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights come from for one load."""

    random_weights: bool = False  # build the architecture from the spec with random (never zero) weights
    seed: int = 0  # for random weights
    hub: HubOptions = HubOptions()


def is_available_locally(spec: ModelSpec, hub: HubOptions = HubOptions()) -> bool:
    """True if the weights can load without a network: a local folder, or the Hub cache holds the model index."""
    if spec.local_dir is not None:
        return (spec.local_dir / "model_index.json").is_file()
    if spec.repo is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.repo, "model_index.json", cache_dir=hub.cache_dir, revision=spec.revision)
    return isinstance(found, str)


def check_access(spec: ModelSpec, source: WeightSource) -> None:
    """Fail fast, with instructions, if a Hub model cannot be reached (gated, offline, missing)."""
    if source.random_weights or spec.local_dir is not None or spec.repo is None:
        return
    from huggingface_hub import hf_hub_download

    with translate_hub_errors(spec, source.hub):
        hf_hub_download(spec.repo, "model_index.json", revision=spec.revision, token=source.hub.token,
                        cache_dir=source.hub.cache_dir, local_files_only=source.hub.is_offline or not _hub_resolves())


def _hub_resolves() -> bool:
    """False when the Hub's host name does not resolve and no proxy would carry the request: a machine with no
    internet (a DGX Spark on a closed LAN). huggingface_hub retries a failed request five times with backoff
    before giving up, which took 33 s and printed ten warnings on such a machine (2026-12-07) for an error that
    was certain from the first DNS failure; a cached copy still loads, since the cache is read either way."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    proxies = urllib.request.getproxies()  # HTTPS_PROXY and ALL_PROXY, which huggingface_hub's client follows
    if proxies.get("https") or proxies.get("all"):
        return True  # the proxy resolves the name, not this machine
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return False
    return True


@contextlib.contextmanager
def translate_hub_errors(spec: ModelSpec, hub: HubOptions) -> Iterator[None]:
    from huggingface_hub import errors as hf

    try:
        yield
    except Exception as exc:  # walk the chain: diffusers and transformers re-raise Hub errors as OSError
        chain, cur = [], exc
        while cur is not None and len(chain) < 10:
            chain.append(cur)
            cur = cur.__cause__ or cur.__context__
        kinds = tuple(type(e) for e in chain)
        text = " ".join(str(e) for e in chain).lower()
        if any(issubclass(k, hf.GatedRepoError) for k in kinds) or "gated repo" in text:
            raise ModelAccessError(
                f"{spec.id} is a gated model. Open {spec.license_url} while logged in and accept its license, then give "
                "this machine a token: `hf auth login`, or set HF_TOKEN=<token from https://huggingface.co/settings/tokens>."
            ) from exc
        if any(issubclass(k, hf.RepositoryNotFoundError) for k in kinds):
            raise ModelAccessError(
                f"Repository {spec.repo} was not found or needs a token you do not have; check the name, or log in "
                "with `hf auth login` / HF_TOKEN.") from exc
        offline_kinds = (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, ConnectionError, TimeoutError)
        if any(issubclass(k, offline_kinds) for k in kinds):
            how = ("offline mode is on (HF_HUB_OFFLINE=1)" if hub.is_offline
                   else "the Hugging Face Hub cannot be reached from this machine")
            raise ModelAccessError(
                f"{spec.id} is not in the local Hugging Face cache and {how}. Download it on a connected machine "
                f"(`hf download {spec.repo}`) and copy the cache, or pass --model /path/to/a/local/folder in the "
                f"Hugging Face layout. {_demo_hint(spec)}"
            ) from exc
        raise


def _demo_hint(spec: ModelSpec) -> str:
    from .registry import demo_specs

    demos = [d.id for d in demo_specs() if d.family is spec.family] or [d.id for d in demo_specs()]
    if not demos:
        return ""
    return (f"The embedded {' and '.join(demos)} model{'s' if len(demos) > 1 else ''} "
            f"work{'' if len(demos) > 1 else 's'} without any download.")


@contextlib.contextmanager
def _building(device: torch.device | str, dtype: torch.dtype, seed: int) -> Iterator[None]:
    """Construct modules directly on `device` in `dtype` from a fixed seed, leaving global RNG state as it was.

    Building in place matters: a 12B model built in fp32 on a CPU and then moved takes minutes.
    """
    device = torch.device(device)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(previous)


def _component_class(library: str, class_name: str) -> Any:
    if library == "diffusers":
        import diffusers as lib
    elif library == "transformers":
        import transformers as lib
    else:
        raise ModelAccessError(f"Component library {library!r} is not supported (only diffusers and transformers).")
    try:
        return getattr(lib, class_name)
    except AttributeError:
        raise ModelAccessError(f"{library} has no class {class_name}; upgrade {library} (pip install -U {library}).") from None


def _no_zero_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random-weight benchmarks must not run on all-zero matrices (zeros can run faster than real data)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2 and not bool(p.any()):
                noise = torch.randn(p.shape, generator=generator, dtype=torch.float32) * 0.02
                p.copy_(noise.to(p.device, p.dtype))


def load_component(spec: ModelSpec, name: str, *, dtype: torch.dtype, device: torch.device | str,
                   source: WeightSource = WeightSource()) -> Any:
    """One component (a torch module, tokenizer or scheduler) of `spec`, ready on `device` in `dtype`."""
    if name not in spec.components:
        raise ModelAccessError(f"{spec.id} has no component {name!r} (it has {', '.join(spec.components)}).")
    comp = spec.components[name]
    cls = _component_class(comp.library, comp.class_name)
    config = {k: v for k, v in comp.config.items() if not k.startswith("_")}

    is_module = not (name.startswith("scheduler") or name.startswith("tokenizer"))
    if not source.random_weights:
        from .downloads import fetch_component
        from .run_context import current_context

        ctx = current_context()
        if ctx is not None:  # inside a job: download first with byte progress and Stop (see downloads.py)
            fetch_component(spec, name, source, ctx)
        with translate_hub_errors(spec, source.hub):
            if not is_module:
                return cls.from_pretrained(**_pretrained_args(spec, name, source))
            module = cls.from_pretrained(**_pretrained_args(spec, name, source), dtype=dtype)
        return module.to(device).eval().requires_grad_(False)

    if name.startswith("scheduler"):
        return cls.from_config(config)
    if name.startswith("tokenizer"):
        build = build_t5_tokenizer if comp.class_name.startswith("T5") else build_clip_tokenizer
        return build(BASIC_WORDS, int(config.get("model_max_length", 77)))
    with _building(device, dtype, source.seed):
        module = cls.from_config(config) if comp.library == "diffusers" else cls(cls.config_class(**config))
    _no_zero_weights(module, torch.Generator().manual_seed(source.seed))
    return cast(module, dtype, device).eval().requires_grad_(False)


def cast(module: torch.nn.Module, dtype: torch.dtype, device: str | torch.device | None = None) -> torch.nn.Module:
    """`module.to(device, dtype)` without diffusers 0.42's false warning: its ModelMixin.to prints "There are
    modules in AutoencoderKL that should be kept in float32: []" on every dtype cast (an empty list passes its
    `is not None` check), once for each component a CPU load casts to FP32. The move itself is nn.Module's."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def _pretrained_args(spec: ModelSpec, name: str, source: WeightSource) -> dict[str, Any]:
    if spec.local_dir is not None:
        return {"pretrained_model_name_or_path": str(spec.local_dir), "subfolder": name}
    if spec.repo is None:
        raise ModelAccessError(f"{spec.id} has no weights to load; use --random-weights.")
    hub = source.hub
    return {"pretrained_model_name_or_path": spec.repo, "subfolder": name, "revision": spec.revision,
            "token": hub.token, "cache_dir": hub.cache_dir, "local_files_only": hub.is_offline}


def default_model(family: Family | None = None, hub: HubOptions = HubOptions()) -> tuple[str, str]:
    """(model id, note): the best model whose weights are here; the embedded demo model when none are.

    The note says what was chosen and how to get the real model, for the CLI and the UI to show.
    """
    from .families import FAMILIES
    from .families.family import ImageUse
    from .registry import HUB_MODELS, demo_specs

    # With no family named, a model that draws from a prompt alone (an editing model needs an input image).
    families = [family] if family else [f for f in Family if FAMILIES[f].image_use is ImageUse.START]
    for fam in families:
        for spec in HUB_MODELS:
            if spec.family is fam and is_available_locally(spec, hub):
                return spec.id, f"Using {spec.id} from the local Hugging Face cache."
    for fam in families:
        for spec in demo_specs():
            if spec.family is fam:
                real = next(s for s in HUB_MODELS if s.family is fam)
                return spec.id, (f"No {fam.label} weights found locally: using the embedded {spec.id} model "
                                 f"(it knows only simple coloured shapes). Choose {real.id} to download the real model "
                                 f"(needs network{' and a Hugging Face token' if real.gated else ''}), or pass a local folder.")
    raise ModelAccessError("No model weights are available here and the embedded demo models are missing; "
                           "pass --model with a registry id (downloads it) or a local folder.")
