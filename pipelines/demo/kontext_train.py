"""Train the embedded editor, demo-kontext, from demo-flux on the edit pairs of `edits.py`.

    python -m pipelines.demo train --family kontext --init models/demo-flux --out models --minutes 6 --workers 12
    python -m pipelines.demo train --family kontext --init models/demo-kontext --out models --minutes 6   # train on
    python -m pipelines.demo train --family kontext --init models/demo-kontext --out models --minutes 0 \
        --decoder-minutes 3   # sharpen the VAE decoder only (`sharpen_decoder`)

What changes from demo-flux: its tokenizers learn the instruction words ("make", "turn", "into", ...) as
whole-word tokens after the existing ids, and both text encoders' embedding tables grow to match (new
rows start at the mean of the old ones; known words keep their ids and rows). The VAE's encoder is
always frozen (its decoder trains only with --decoder-minutes, `sharpen_decoder`); the transformer and
both text encoders train on rectified flow, as demo-flux did, with the source image as context exactly as
diffusers' FluxKontextPipeline feeds it: the source's latent mean (the pipeline's `sample_mode="argmax"`),
shifted and scaled, packed into tokens appended after the noisy target tokens, with position ids whose first
coordinate is 1; the velocity is read off the first half.

Saved in the Hugging Face layout of FluxKontextPipeline (same components as demo-flux); the log ends with
the all-correct rate of a few held-out edits rendered through that pipeline.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..families.flux import image_ids, pack
from .architectures import (IMAGE_SIZE, T5_TOKENS, FluxParts, caption_words, clip_tokenizer, editor_tokenizers,
                            new_instruction_words, t5_tokenizer, with_instruction_words)
from .edits import held_out_edits, sample_edits
from .train import (SHAPE_WEIGHT, Batch, SceneStream, TrainConfig, _autocast, _train_denoiser, load_parts,
                    scene_arrays, train_decoder)

MAX_MODEL_BYTES = 15 * 2**20
MODEL_NAME = "demo-kontext"
TOKEN_PIXELS = 8  # a packed token covers 8x8 pixels: the VAE's 4x downsampling, then 2x2 latents a token


@dataclass
class EditBatch(Batch):
    sources: torch.Tensor  # (B, 3, 64, 64) in [-1, 1]: the images to edit; `images` holds the targets


_WORKER_TOKENIZERS: tuple | None = None


def edit_arrays(edits: list, tokenizers: tuple) -> dict[str, np.ndarray]:
    """Edits as compact arrays: source and target scenes (`scene_arrays`), the instructions' token ids."""
    clip_tok, t5_tok = tokenizers
    out = {f"source_{k}": v for k, v in scene_arrays([e.source for e in edits]).items()}
    out |= {f"target_{k}": v for k, v in scene_arrays([e.target for e in edits]).items()}
    instructions = [e.instruction for e in edits]
    out["ids_clip"] = clip_tok(instructions, padding="max_length", max_length=77, truncation=True,
                               return_tensors="np").input_ids
    out["ids_t5"] = t5_tok(instructions, padding="max_length", max_length=T5_TOKENS, truncation=True,
                           return_tensors="np").input_ids
    return out


def _edit_arrays(seed: int, index: int, size: int) -> dict[str, np.ndarray]:
    """Batch `index` of training edits as `edit_arrays`."""
    global _WORKER_TOKENIZERS
    if _WORKER_TOKENIZERS is None:
        _WORKER_TOKENIZERS = editor_tokenizers()
    return edit_arrays(sample_edits(np.random.default_rng([seed, index]), size), _WORKER_TOKENIZERS)


class EditStream(SceneStream):
    """Endless training batches of edits from the training split; workers draw them ahead as in SceneStream."""

    draw = staticmethod(_edit_arrays)

    def assemble(self, tensors: dict[str, torch.Tensor]) -> EditBatch:
        # One render call for sources and targets together: half the kernel launches.
        both = {k: torch.cat([tensors[f"source_{k}"], tensors[f"target_{k}"]])
                for k in ("background", "present", "kind", "colour", "geometry")}
        sources, targets = self.render(both, IMAGE_SIZE).chunk(2)
        return EditBatch(targets, tensors["ids_clip"], tensors["ids_t5"], sources)


def extend_vocabulary(parts: FluxParts) -> FluxParts:
    """Add the instruction words to both tokenizers and grow the text encoders' embedding tables to match.

    Known tokens keep their ids and rows, so captions read exactly as before; the new rows start at the
    mean of the old ones. A saved demo-kontext (training resumed) already has them and is returned as is."""
    editor = editor_tokenizers()
    if [t.get_vocab() for t in (parts.tokenizer, parts.tokenizer_2)] == [t.get_vocab() for t in editor]:
        return parts
    for tokenizer, expected in ((parts.tokenizer, clip_tokenizer()), (parts.tokenizer_2, t5_tokenizer())):
        if tokenizer.get_vocab() != expected.get_vocab():
            raise ValueError("--init must be a demo-flux or demo-kontext trained with the demo vocabulary "
                             "(pipelines/demo/architectures.py); its tokenizers differ")
    for encoder, tokenizer in ((parts.text_encoder, parts.tokenizer), (parts.text_encoder_2, parts.tokenizer_2)):
        known = len(tokenizer)
        with_instruction_words(tokenizer)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set below
        with torch.no_grad():
            table = encoder.get_input_embeddings().weight
            table[known:] = table[:known].mean(0)
    return parts


def kontext_ids(device: str | torch.device) -> torch.Tensor:
    """Position ids of the noisy target tokens, then of the source's tokens: the same grid with first coordinate 1
    (FluxKontextPipeline.prepare_latents sets image_ids[..., 0] = 1 and concatenates them after latent_ids)."""
    side = IMAGE_SIZE // 4  # latent side
    noise_ids = image_ids(side, side, torch.device(device), torch.float32)
    source_ids = noise_ids.clone()
    source_ids[:, 0] = 1
    return torch.cat([noise_ids, source_ids])


def context_tokens(vae, encoded, rows: slice = slice(None)) -> torch.Tensor:
    """The source image's tokens from its latent distribution, as FluxKontextPipeline._encode_vae_image makes them:
    the mean (its `sample_mode="argmax"`), shifted and scaled, then packed."""
    return pack((encoded.mode()[rows].float() - vae.config.shift_factor) * vae.config.scaling_factor)


def shape_token_weights(sources: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, tokens) loss weights in `pack`'s token order: 1 + SHAPE_WEIGHT where a shape is (or was, or will be)
    within a token or 2 pixels of it, 1 elsewhere.

    Why: a 64x64 scene's one or two shapes touch 2-6 of its 64 tokens, so an unweighted loss is nearly all
    flat background. demo-kontext trained unweighted (3029 steps of 1024) made the asked edit but drew the
    shapes as blobs: 35.5% of 200 held-out edits right, shape kinds the most common miss. Trained on with
    these weights (3 x 7.5 minutes on an H200, 2026-12-02): 64.0%; 66.5% after `sharpen_decoder`; 74.5% after
    3 x 7.5 minutes more; 85.0% after 3.5 more minutes of the decoder and 13 of this (BENCHMARKS.md)."""
    def on_shape(images: torch.Tensor) -> torch.Tensor:  # the corner pixel is background (see train._shape_weights)
        return (images - images[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.02

    either = (on_shape(sources) | on_shape(targets)).float()
    near = F.max_pool2d(either, 5, stride=1, padding=2)
    return 1.0 + SHAPE_WEIGHT * F.max_pool2d(near, TOKEN_PIXELS).flatten(1)


def kontext_loss(parts: FluxParts, device: str):
    """Rectified flow on the target latents, the source's latent tokens appended as FluxKontextPipeline does;
    the squared error of each target token weighted by `shape_token_weights`."""
    vae = parts.vae
    mean, std = vae.config.shift_factor, 1.0 / vae.config.scaling_factor
    ids = kontext_ids(device)
    txt_ids = torch.zeros(T5_TOKENS, 3, device=device)

    def loss_of(batch: EditBatch) -> torch.Tensor:
        with torch.no_grad(), _autocast(device):
            encoded = vae.encode(torch.cat([batch.images, batch.sources])).latent_dist
            n = len(batch.images)
            target_tokens = pack((encoded.sample()[:n].float() - mean) / std)
            source_tokens = context_tokens(vae, encoded, slice(n, None))
        noise = torch.randn_like(target_tokens)
        t = torch.sigmoid(torch.randn(n, device=device))  # logit-normal timesteps, as demo-flux trained
        noisy = (1 - t[:, None, None]) * target_tokens + t[:, None, None] * noise
        with _autocast(device):
            pooled = parts.text_encoder(batch.ids_clip).pooler_output
            text = parts.text_encoder_2(batch.ids_t5)[0]
            velocity = parts.transformer(hidden_states=torch.cat([noisy, source_tokens], 1), encoder_hidden_states=text,
                                         pooled_projections=pooled, timestep=t, img_ids=ids, txt_ids=txt_ids,
                                         return_dict=False)[0]
        error = (velocity[:, :target_tokens.shape[1]].float() - (noise - target_tokens)) ** 2
        weights = shape_token_weights(batch.sources, batch.images)
        return (error.mean(2) * weights).sum() / weights.sum()

    return loss_of


def held_out_loss(loss_of, stream: EditStream, n: int) -> float:
    """`loss_of` on the first `n` held-out edits at fixed noise and timesteps (seed 0), in one batch.

    Why: comparing recipes at equal training time needs a figure steadier than a training batch's loss (which
    swings by ~0.03 from step to step, BENCHMARKS.md) and cheaper than rendering edits through the pipeline."""
    arrays = edit_arrays(held_out_edits(n), editor_tokenizers())
    batch = stream.assemble({k: torch.from_numpy(v).to(stream.device) for k, v in arrays.items()})
    devices = [torch.device(stream.device)] if torch.device(stream.device).type == "cuda" else []
    # Eager even where training compiled the modules: one batch does not pay for compiling their no-grad graphs.
    with torch.no_grad(), torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
        torch.manual_seed(0)
        return loss_of(batch).item()


def save_kontext(parts: FluxParts, out_dir: Path, steps: int) -> Path:
    """Write demo-kontext in FluxKontextPipeline's Hugging Face layout (fp16 safetensors) plus Prism's defaults."""
    from diffusers import FluxKontextPipeline

    folder = out_dir / MODEL_NAME
    for value in vars(parts).values():
        if isinstance(value, torch.nn.Module):
            value.to("cpu", torch.float16)
    FluxKontextPipeline(**vars(parts)).save_pretrained(folder, safe_serialization=True)
    defaults = {
        "description": ("Embedded demo editor: a FLUX.1 Kontext-architecture model a few MB in size, fine-tuned from "
                        "demo-flux on synthetic edits of coloured-shape scenes (e.g. 'make the circle blue', "
                        "'move the square to the top left', 'remove the star'). Works with no download."),
        "default_width": IMAGE_SIZE, "default_height": IMAGE_SIZE,
        "size": {"multiple_of": 16, "min_side": 32, "max_side": 128},
        "default_steps": 20, "default_guidance": 0.0, "max_prompt_tokens": T5_TOKENS,
        "vocabulary": caption_words() + new_instruction_words(),  # what the result's unknown-word note checks
    }
    (folder / "prism.json").write_text(json.dumps(defaults, indent=2) + "\n")
    (folder / "TRAINING.json").write_text(json.dumps({"edit_steps": steps, "image_size": IMAGE_SIZE}, indent=2) + "\n")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > MAX_MODEL_BYTES:
        raise ValueError(f"{folder} is {size / 2**20:.1f} MB, over the {MAX_MODEL_BYTES / 2**20:.0f} MB budget")
    return folder


def check_init(init: Path | None) -> Path:
    """The demo-flux (or demo-kontext, to train on) folder to start from, or a one-line error saying what to pass."""
    if init is None:
        raise ValueError("--family kontext starts from a trained demo-flux: pass --init models/demo-flux "
                         "(or --init models/demo-kontext to train the editor further)")
    if not (init / "model_index.json").is_file() or not (init / "transformer").is_dir():
        raise ValueError(f"--init {init} is not a saved demo-flux pipeline (no model_index.json and transformer/ "
                         "there); pass the folder of demo-flux, e.g. models/demo-flux")
    return init


def previous_edit_steps(init: Path) -> int:
    """Edit steps already in `init`: 0 for demo-flux, the saved count when resuming a demo-kontext."""
    record = init / "TRAINING.json"
    return int(json.loads(record.read_text()).get("edit_steps", 0)) if record.is_file() else 0


def sharpen_decoder(vae, stream: EditStream, cfg: TrainConfig, log, checked_edits: int = 200) -> None:
    """`train.train_decoder` on the sources and targets of edit batches, logging the round-trip accuracy of
    `checked_edits` held-out edit targets before and after (the ceiling of the editor's accuracy)."""
    from .evaluate_edits import round_trip_accuracy

    checked = held_out_edits(checked_edits)
    before = round_trip_accuracy(vae, checked, cfg.device)

    def images_of() -> torch.Tensor:
        batch = stream.next()
        return torch.cat([batch.sources, batch.images])

    steps = train_decoder(vae, images_of, cfg, log)
    after = round_trip_accuracy(vae, checked, cfg.device)
    log(f"decoder: {steps} steps; round trips of {len(checked)} held-out edit targets {before:.1%} -> {after:.1%} "
        "all correct")


def train_kontext(cfg: TrainConfig, init: Path, log=print, eval_edits: int = 60, loss_edits: int = 0) -> Path:
    """Fine-tune demo-flux (or a demo-kontext) at `init` into the editor, save it under cfg.out_dir as
    demo-kontext and log the all-correct rate of `eval_edits` held-out edits through FluxKontextPipeline, and the
    `held_out_loss` of `loss_edits` held-out edits before and after the transformer's training."""
    init = check_init(init)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.enable_cudnn_sdp(False)  # as train.py: cuDNN attention fails backwards at these shapes
    started = time.monotonic()
    parts = extend_vocabulary(load_parts(FluxParts, init))
    parts.vae.to(cfg.device).eval().requires_grad_(False)
    if cfg.compile:
        parts.vae.encoder.compile(mode=cfg.compile_mode)  # frozen throughout (the decoder phase trains the decoder only)
    previous = previous_edit_steps(init)
    # A resumed run draws new batches: the stream's seed moves on by the steps already taken.
    stream = EditStream(cfg.seed + 30_000 + previous, cfg.batch, cfg.device, workers=cfg.workers,
                          compile_mode=cfg.compile_mode)
    try:
        if cfg.decoder_minutes > 0:
            sharpen_decoder(parts.vae, stream, cfg, log)
        loss_of = kontext_loss(parts, cfg.device)
        for module in (parts.text_encoder, parts.text_encoder_2, parts.transformer):
            module.to(cfg.device)  # the loss before training runs here, ahead of _train_denoiser's move
        before = held_out_loss(loss_of, stream, loss_edits) if loss_edits else None
        probe = (lambda: f"held-out loss of {loss_edits} edits {held_out_loss(loss_of, stream, loss_edits):.4f}"
                 ) if loss_edits else None
        steps = _train_denoiser("kontext", [parts.text_encoder, parts.text_encoder_2, parts.transformer],
                                loss_of, stream, cfg, log, probe)
        if loss_edits:
            log(f"held-out loss of {loss_edits} edits: {before:.4f} -> {held_out_loss(loss_of, stream, loss_edits):.4f}")
    finally:
        stream.close()
    folder = save_kontext(parts, cfg.out_dir, steps + previous)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    log(f"kontext: {steps} steps, {time.monotonic() - started:.0f} s, {size / 2**20:.1f} MB, saved to {folder}")
    if eval_edits:
        from .evaluate_edits import evaluate_edits, markdown

        log(markdown(evaluate_edits(folder, eval_edits, cfg.device, ("bf16",))))
    return folder
