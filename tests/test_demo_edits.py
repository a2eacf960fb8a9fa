"""Edit pairs for demo-kontext, the scorer's judgement of edits, and the editor's trainer on a CPU."""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.demo.edits import (INSTRUCTION_WORDS, EditKind, edit_key, held_out_edits, sample_edit, sample_edits,
                                  split_of_edit)
from pipelines.demo.evaluate_edits import edit_accuracy
from pipelines.demo.scenes import Split, render

DEMO_FLUX = Path(__file__).resolve().parents[1] / "models" / "demo-flux"
SHAPE_FIELDS = ("kind", "colour", "size", "position")


def _fields(shape) -> tuple:
    return tuple(getattr(shape, f) for f in SHAPE_FIELDS) + (shape.jitter,)


def _changed_fields(before, after) -> set[str]:
    return {f for f in SHAPE_FIELDS if getattr(before, f) != getattr(after, f)}


@pytest.mark.parametrize("kind", list(EditKind))
def test_targets_differ_from_sources_only_in_the_asked_attribute(kind):
    rng = np.random.default_rng(7)
    for _ in range(150):
        edit = sample_edit(rng, kind)
        source, target, words = edit.source, edit.target, edit.instruction.split()
        assert edit.kind is kind and source != target
        if kind is EditKind.BACKGROUND:
            assert [_fields(s) for s in target.shapes] == [_fields(s) for s in source.shapes]
            assert target.background != source.background and words[-1] == target.background
            continue
        assert target.background == source.background
        if kind is EditKind.ADD:
            assert len(source.shapes) == 1 and len(target.shapes) == 2
            assert _fields(target.shapes[0]) == _fields(source.shapes[0])
            added = target.shapes[1]
            assert edit.instruction == f"add a {added.size} {added.colour} {added.kind} " + \
                {"center": "in the center", "left": "on the left", "right": "on the right"}.get(
                    added.position, f"at the {added.position}")
            continue
        if kind is EditKind.REMOVE:
            assert len(source.shapes) == 2 and len(target.shapes) == 1
            kept = [s for s in source.shapes if _fields(s) == _fields(target.shapes[0])]
            removed = [s for s in source.shapes if _fields(s) != _fields(target.shapes[0])]
            assert len(kept) == 1 and len(removed) == 1
            named = edit.instruction.removeprefix("remove the ").split()
            assert named[-1] == removed[0].kind and (len(named) == 1 or named[0] == removed[0].colour)
            continue
        assert len(target.shapes) == len(source.shapes)
        changed = [i for i, (a, b) in enumerate(zip(source.shapes, target.shapes)) if _fields(a) != _fields(b)]
        assert len(changed) == 1
        before, after = source.shapes[changed[0]], target.shapes[changed[0]]
        asked = {EditKind.COLOUR: "colour", EditKind.KIND: "kind", EditKind.MOVE: "position"}[kind]
        assert _changed_fields(before, after) == {asked} and after.jitter == before.jitter
        # The instruction names the changed shape (by kind, or colour and kind) and the new value.
        assert before.kind in words and edit.instruction.endswith(after.position if kind is EditKind.MOVE
                                                                  else getattr(after, asked))
        others = [s for s in source.shapes if s is not before]
        if any(o.kind == before.kind for o in others):
            assert f"the {before.colour} {before.kind}" in edit.instruction


def test_every_instruction_uses_the_editor_vocabulary():
    """Instructions use caption words plus the instruction verbs; each new word is one token, known words are
    split exactly as the caption tokenizers split them (what demo-flux learned to read)."""
    from pipelines.demo.architectures import (caption_words, clip_tokenizer, editor_tokenizers, new_instruction_words,
                                              t5_tokenizer)

    new = set(new_instruction_words())
    assert new == set(INSTRUCTION_WORDS) - set(caption_words()) and {"make", "turn", "move", "remove", "add"} <= new
    pairs = list(zip(editor_tokenizers(), (clip_tokenizer(), t5_tokenizer())))
    for editor, caption in pairs:  # known tokens keep their ids: the text encoders' rows stay theirs
        assert len(editor) > len(caption)
        assert {t: editor.get_vocab()[t] for t in caption.get_vocab()} == caption.get_vocab()
    for edit in sample_edits(np.random.default_rng(1), 300):
        words = edit.instruction.split()
        assert set(words) <= set(caption_words()) | new, edit.instruction
        for editor, caption in pairs:
            expected = [t for w in words for t in ([w] if w in new else caption.tokenize(w))]
            assert editor.tokenize(edit.instruction) == expected, edit.instruction


def test_held_out_edits_are_fixed_distinct_balanced_and_never_drawn_for_training():
    held_out = held_out_edits(200)
    keys = [edit_key(e.source, e.instruction) for e in held_out]
    assert len(set(keys)) == 200
    assert [edit_key(e.source, e.instruction) for e in held_out_edits(200)] == keys
    assert [e.instruction for e in held_out_edits(12)] == [e.instruction for e in held_out[:12]]
    assert all(split_of_edit(e.source, e.instruction) is Split.HELD_OUT for e in held_out)
    assert set(Counter(e.kind for e in held_out).values()) == {33, 34}
    assert [e.instruction for e in held_out_edits(20, seed=1)] != [e.instruction for e in held_out[:20]]
    training = sample_edits(np.random.default_rng(0), 4000)
    assert set(keys).isdisjoint(edit_key(e.source, e.instruction) for e in training)
    assert all(split_of_edit(e.source, e.instruction) is Split.TRAIN for e in training)
    assert set(Counter(e.kind for e in training)) == set(EditKind)


def test_an_edit_must_change_the_scene():
    with pytest.raises(ValueError, match="leaves the scene unchanged"):
        edit = held_out_edits(1)[0]
        dataclasses.replace(edit, target=edit.source)


def test_the_scorer_judges_an_edit_by_its_target():
    """Clean renders of the targets are right edits; renders of the unchanged sources are wrong, for every kind."""
    edits = held_out_edits(60)
    targets = edit_accuracy([render(e.target, 64) for e in edits], edits)
    sources = edit_accuracy([render(e.source, 64) for e in edits], edits)
    assert targets == {"all": 1.0} | {k.value: 1.0 for k in EditKind}
    assert sources == {"all": 0.0} | {k.value: 0.0 for k in EditKind}


def test_edit_accuracy_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="as many images as edits"):
        edit_accuracy([], held_out_edits(1))


def test_training_batches_render_the_edits_they_name():
    """A batch from the training stream: sources and targets drawn as the edits say, instructions tokenized."""
    from pipelines.demo.architectures import editor_tokenizers
    from pipelines.demo.kontext_train import EditStream
    from pipelines.demo.scorer import score
    from pipelines.sampling import decoded_to_images

    batch = EditStream(seed=5, batch=12, device="cpu").next()
    edits = sample_edits(np.random.default_rng([5, 0]), 12)
    assert batch.images.shape == batch.sources.shape == (12, 3, 64, 64)
    for image, edit in zip(decoded_to_images(batch.sources), edits):
        assert score(image, edit.source).all_correct
    assert edit_accuracy(decoded_to_images(batch.images), edits)["all"] == 1.0
    clip, t5 = editor_tokenizers()
    instructions = [e.instruction for e in edits]
    assert batch.ids_t5.tolist() == t5(instructions, padding="max_length", max_length=32).input_ids
    assert batch.ids_clip.tolist() == clip(instructions, padding="max_length", max_length=77).input_ids


def test_loss_weights_mark_the_tokens_a_shape_touches_before_or_after_the_edit():
    """The editor's loss weighs the tokens where the source or the target has a shape; tokens in pack's order."""
    from pipelines.demo.kontext_train import TOKEN_PIXELS, shape_token_weights
    from pipelines.demo.train import SHAPE_WEIGHT
    from pipelines.families.flux import pack

    sources, targets = torch.full((2, 3, 64, 64), -1.0), torch.full((2, 3, 64, 64), -1.0)
    sources[0, :, 20:23, 41:44] = 1.0  # in token row 2, column 5 (8-pixel tokens)
    targets[0, :, 50:52, 9:11] = 1.0  # a shape added in token row 6, column 1
    targets[1] = 0.5  # a new background colour alone: no token is a shape's
    weights = shape_token_weights(sources, targets)
    assert weights.shape == (2, (64 // TOKEN_PIXELS) ** 2)
    # Which token a pixel lands in, as pack orders tokens: mark two latent cells and see where they go.
    marks = torch.zeros(1, 1, 16, 16)
    marks[0, 0, 21 // 4, 42 // 4] = 1.0
    marks[0, 0, 51 // 4, 10 // 4] = 2.0
    order = pack(marks.repeat(1, 1, 1, 1))[0].amax(1)
    heavy = {int(i) for i in torch.nonzero(weights[0] > 1).flatten()}
    assert {int(torch.nonzero(order == 1)[0]), int(torch.nonzero(order == 2)[0])} <= heavy
    assert len(heavy) <= 8  # the two tokens and, within 2 pixels, their neighbours only
    assert weights[0].max() == 1 + SHAPE_WEIGHT and weights[0].min() == 1.0
    assert torch.equal(weights[1], torch.ones(64))


def test_workers_draw_the_same_batches_as_the_main_process():
    """The GPU run draws edits in spawned workers; batch k is the same whichever process draws it."""
    from pipelines.demo.kontext_train import EditStream

    local, pooled = EditStream(seed=2, batch=8, device="cpu"), EditStream(seed=2, batch=8, device="cpu", workers=1)
    try:
        for _ in range(2):
            a, b = local.next(), pooled.next()
            assert torch.equal(a.images, b.images) and torch.equal(a.sources, b.sources)
            assert torch.equal(a.ids_clip, b.ids_clip)
    finally:
        pooled.close()


def test_new_words_leave_the_known_words_meaning_alone():
    """Growing the vocabulary renumbers tokens; the text encoders still read a caption exactly as before."""
    from pipelines.demo.architectures import FluxParts
    from pipelines.demo.kontext_train import extend_vocabulary
    from pipelines.demo.train import load_parts

    parts = load_parts(FluxParts, DEMO_FLUX)
    text = "a small red circle at the top left on a blue background"

    def encoded(p):
        with torch.no_grad():
            clip = p.text_encoder(p.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids)
            t5 = p.text_encoder_2(p.tokenizer_2(text, padding="max_length", max_length=32, return_tensors="pt").input_ids)
        return clip.pooler_output, t5[0]

    before = encoded(parts)
    old_size = len(parts.tokenizer)
    parts = extend_vocabulary(parts)
    after = encoded(parts)
    assert len(parts.tokenizer) > old_size
    assert parts.text_encoder.config.vocab_size == len(parts.tokenizer)
    assert parts.text_encoder_2.get_input_embeddings().weight.shape[0] == len(parts.tokenizer_2)
    assert torch.allclose(before[0], after[0], atol=1e-5) and torch.allclose(before[1], after[1], atol=1e-5)
    assert parts.tokenizer.tokenize("turn the square into a star") == \
        ["turn", "the</w>", "square</w>", "into", "a</w>", "star</w>"]


# --- the trainer, end to end on a CPU ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pipelines.demo.kontext_train import train_kontext
    from pipelines.demo.train import TrainConfig

    lines: list[str] = []
    out = tmp_path_factory.mktemp("kontext")
    folder = train_kontext(TrainConfig(family="kontext", out_dir=out, device="cpu", batch=4, denoiser_minutes=1.0,
                                       max_denoiser_steps=3, log_every=1, workers=0),
                           DEMO_FLUX, log=lines.append, eval_edits=0)
    return folder, lines


def test_smoke_training_saves_a_kontext_pipeline_diffusers_loads(trained):
    from diffusers import FluxKontextPipeline

    from pipelines.demo.evaluate_edits import edit_images

    folder, lines = trained
    assert folder.name == "demo-kontext"
    assert [line.split(":")[0] for line in lines[:3]] == ["kontext step 0", "kontext step 1", "kontext step 2"]
    assert all(np.isfinite(float(line.split("loss ")[1].split()[0])) for line in lines[:3])
    index = json.loads((folder / "model_index.json").read_text())
    flux_index = json.loads((DEMO_FLUX / "model_index.json").read_text())
    assert index["_class_name"] == "FluxKontextPipeline"
    assert {k: v for k, v in index.items() if not k.startswith("_")} == \
        {k: v for k, v in flux_index.items() if not k.startswith("_")}
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 15 * 2**20
    assert json.loads((folder / "TRAINING.json").read_text())["edit_steps"] == 3
    pipe = FluxKontextPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.tokenize("make the circle blue") == ["make", "the</w>", "circle</w>", "blue</w>"]
    images = edit_images(pipe, held_out_edits(2), steps=2)
    assert [im.size for im in images] == [(64, 64), (64, 64)]


def test_training_resumes_from_a_saved_editor(trained, tmp_path):
    from diffusers import FluxKontextPipeline

    from pipelines.demo.kontext_train import train_kontext
    from pipelines.demo.train import TrainConfig

    folder = train_kontext(TrainConfig(family="kontext", out_dir=tmp_path, device="cpu", batch=4, denoiser_minutes=1.0,
                                       max_denoiser_steps=1, log_every=1000, workers=0),
                           trained[0], log=lambda _: None, eval_edits=0)
    assert json.loads((folder / "TRAINING.json").read_text())["edit_steps"] == 4
    before, after = (FluxKontextPipeline.from_pretrained(f) for f in (trained[0], folder))
    assert len(after.tokenizer) == len(before.tokenizer) and len(after.tokenizer_2) == len(before.tokenizer_2)
    assert after.text_encoder.config.vocab_size == before.text_encoder.config.vocab_size


def test_held_out_loss_is_fixed_for_a_model_moves_with_training_and_is_logged(trained, tmp_path):
    """The recipe-comparison figure: the same for the same weights (fixed noise and timesteps, the caller's random
    state untouched), different for other weights; train_kontext logs it before and after training."""
    from pipelines.demo.architectures import FluxParts
    from pipelines.demo.kontext_train import EditStream, held_out_loss, kontext_loss, train_kontext
    from pipelines.demo.train import TrainConfig, load_parts

    stream = EditStream(0, 4, "cpu")
    trained_loss = kontext_loss(load_parts(FluxParts, trained[0]), "cpu")
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = held_out_loss(trained_loss, stream, 6)
    assert torch.equal(torch.get_rng_state(), state)
    assert held_out_loss(trained_loss, stream, 6) == first and first > 0
    other = load_parts(FluxParts, trained[0])
    with torch.no_grad():
        for p in other.transformer.proj_out.parameters():
            p.mul_(0.5)
    assert held_out_loss(kontext_loss(other, "cpu"), stream, 6) != first

    lines: list[str] = []
    train_kontext(TrainConfig(family="kontext", out_dir=tmp_path, device="cpu", batch=4, denoiser_minutes=1.0,
                              max_denoiser_steps=1, log_every=1000, workers=0),
                  trained[0], log=lines.append, eval_edits=0, loss_edits=6)
    [logged] = [line for line in lines if line.startswith("held-out loss")]
    before, after = (float(x) for x in logged.split(": ")[1].split(" -> "))
    assert before == pytest.approx(first, abs=1e-4) and after != before


def test_probe_minutes_log_the_held_out_loss_during_training(trained, tmp_path):
    """--probe-minutes: the loss curve of a long run, logged while it trains; none without it."""
    from pipelines.demo.kontext_train import train_kontext
    from pipelines.demo.train import TrainConfig

    def probes(minutes: float) -> list[tuple[int, float]]:
        lines: list[str] = []
        train_kontext(TrainConfig(family="kontext", out_dir=tmp_path, device="cpu", batch=4, denoiser_minutes=1.0,
                                  max_denoiser_steps=3, log_every=1000, workers=0, probe_minutes=minutes),
                      trained[0], log=lines.append, eval_edits=0, loss_edits=6)
        found = [line for line in lines if line.startswith("kontext step") and "held-out loss of 6 edits" in line]
        return [(int(line.split()[2]), float(line.rsplit(" ", 1)[1])) for line in found]

    curve = probes(1e-9)  # due before every step
    assert [step for step, _ in curve] == [0, 1, 2]
    assert all(np.isfinite(loss) and loss > 0 for _, loss in curve)
    assert curve[1][1] != curve[0][1]  # it measures the weights as they train
    assert probes(0.0) == []


def test_zero_minutes_of_training_saves_the_editor_unchanged(trained, tmp_path):
    """`--minutes 0` is how a decoder-only run (`--decoder-minutes`) leaves the transformer as it was."""
    from safetensors.torch import load_file

    from pipelines.demo.kontext_train import train_kontext
    from pipelines.demo.train import TrainConfig

    folder = train_kontext(TrainConfig(family="kontext", out_dir=tmp_path, device="cpu", batch=4, denoiser_minutes=0.0,
                                       workers=0), trained[0], log=lambda _: None, eval_edits=0)
    assert json.loads((folder / "TRAINING.json").read_text())["edit_steps"] == 3
    weights = "transformer/diffusion_pytorch_model.safetensors"
    before, after = load_file(trained[0] / weights), load_file(folder / weights)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_training_feeds_the_transformer_as_flux_kontext_pipeline_does(trained, diffusers_encoder_on_contiguous_input):
    """Capture what FluxKontextPipeline hands the transformer; the trainer builds the same ids and source tokens."""
    from diffusers import FluxKontextPipeline

    from pipelines.demo.kontext_train import context_tokens, kontext_ids

    pipe = FluxKontextPipeline.from_pretrained(trained[0], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    pipe.transformer.register_forward_hook(lambda _m, _a, kwargs, _out: seen.update(kwargs), with_kwargs=True)
    source = render(held_out_edits(1)[0].source, 64)
    pipe(image=source, prompt="make the circle blue", height=64, width=64, max_area=64 * 64, _auto_resize=False,
         num_inference_steps=1, max_sequence_length=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["img_ids"], kontext_ids("cpu"))
    assert torch.equal(seen["txt_ids"], torch.zeros(32, 3))
    pixels = torch.from_numpy(np.asarray(source, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    with torch.no_grad():
        expected = context_tokens(pipe.vae, pipe.vae.encode(pixels).latent_dist)
    assert seen["hidden_states"].shape == (1, 128, 64)
    assert torch.allclose(seen["hidden_states"][:, 64:], expected, atol=1e-4)


def test_evaluate_edits_prints_a_table_per_precision(trained, capsys):
    from pipelines.demo.evaluate_edits import main

    main(["--model", str(trained[0]), "--n", "2", "--precision", "bf16", "fp8", "--steps", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| precision | runs as | edits | all kinds | colour | kind | move | background | add | remove |"
    cells = [row.strip("| ").split(" | ") for row in table[2:]]
    assert [(c[0], c[2]) for c in cells] == [("bf16", "2"), ("fp8", "2")]
    assert cells[1][1].startswith("FP8")
    # Two edits are a colour and a kind change (the kinds in turn); kinds not evaluated show "-".
    assert all(c[4].endswith("%") and c[5].endswith("%") and c[6:] == ["-"] * 4 for c in cells)
    assert re.search(r"^VAE round trip of the 2 target scenes: \d+\.\d% all correct", out, re.M)


class _RoundTripVae(torch.nn.Module):
    """A stand-in VAE whose round trip hands the pixels back unchanged, or flattened to their mean colour."""

    def __init__(self, flatten: bool):
        super().__init__()
        self.flatten, self.weight = flatten, torch.nn.Parameter(torch.zeros(1))

    def encode(self, pixels):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: pixels))

    def decode(self, latents):
        return SimpleNamespace(sample=latents.mean((2, 3), keepdim=True).expand_as(latents) if self.flatten else latents)


@pytest.mark.parametrize("flatten,expected", [(False, 1.0), (True, 0.0)])
def test_round_trip_accuracy_scores_the_decoded_targets(flatten, expected):
    from pipelines.demo.evaluate_edits import round_trip_accuracy

    assert round_trip_accuracy(_RoundTripVae(flatten), held_out_edits(12), "cpu") == expected


def test_decoder_training_changes_the_decoder_and_keeps_the_encoder():
    """So the latents, and with them a transformer trained on them, stay valid."""
    from diffusers import AutoencoderKL

    from pipelines.demo.kontext_train import EditStream, sharpen_decoder
    from pipelines.demo.train import TrainConfig

    vae = AutoencoderKL.from_pretrained(DEMO_FLUX / "vae", dtype=torch.float32)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    stream, lines = EditStream(0, 2, "cpu"), []
    try:
        sharpen_decoder(vae, stream, TrainConfig(family="kontext", out_dir=Path("unused"), device="cpu", vae_steps=2,
                                                 decoder_minutes=1.0, log_every=1), lines.append, checked_edits=4)
    finally:
        stream.close()
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("decoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert not any(p.requires_grad for p in vae.parameters())
    assert [line.split(":")[0] for line in lines[:2]] == ["decoder step 0", "decoder step 1"]
    assert re.fullmatch(r"decoder: 2 steps; round trips of 4 held-out edit targets \d+\.\d% -> \d+\.\d% all correct",
                        lines[-1]), lines[-1]


# --- bad input: one line that says what to change, no stack trace ------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--family", "kontext"], "pass --init models/demo-flux"),
    (["--family", "kontext", "--init", "{tmp}"], "is not a saved demo-flux pipeline"),
    (["--family", "flux", "--decoder-minutes", "2"], "use it with --family kontext"),
    (["--family", "kontext", "--init", str(DEMO_FLUX), "--decoder-minutes", "-1"], "must be 0 or more"),
    (["--family", "kontext", "--init", str(DEMO_FLUX), "--minutes", "-0.5"], "must be 0 or more"),
    (["--family", "kontext", "--init", str(DEMO_FLUX), "--probe-minutes", "-2"], "must be 0 or more"),
    (["--family", "sdxl", "--probe-minutes", "2"], "logs demo-kontext's held-out loss"),
    (["--family", "kontext", "--init", str(DEMO_FLUX), "--cuda-graphs"], "use it with --device cuda"),
])
def test_train_kontext_rejects_bad_arguments(tmp_path, capsys, argv, message):
    from pipelines.demo.train import main

    with pytest.raises(SystemExit) as exit_:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert not any(tmp_path.glob("demo-*"))


@pytest.mark.parametrize("argv,message", [
    (["--model", "{tmp}/nothing"], "holds no saved pipeline"),
    (["--model", str(DEMO_FLUX), "--n", "0"], "--n and --steps must be at least 1"),
    (["--model", str(DEMO_FLUX), "--precision", "fp16"], "invalid choice: 'fp16'"),
])
def test_evaluate_edits_rejects_bad_arguments(tmp_path, capsys, argv, message):
    from pipelines.demo.evaluate_edits import main

    with pytest.raises(SystemExit) as exit_:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


def test_compile_flag_compiles_what_a_step_runs_and_saves_weights_under_their_names(trained, tmp_path, monkeypatch):
    """`--compile` (TrainConfig.compile) compiles in place the trained modules and the frozen VAE encoder, and the
    renderer as one graph. Dynamo's "eager" backend stands in for inductor so the test traces the real forward,
    backward and renderer (fullgraph: a graph break would fail here) without minutes of code generation."""
    from safetensors.torch import load_file

    from pipelines.demo.kontext_train import train_kontext
    from pipelines.demo.train import TrainConfig, main, render_arrays

    compiled, compiled_functions = [], []
    original, original_function = torch.nn.Module.compile, torch.compile

    def compile_for_test(module, *args, **kwargs):
        compiled.append((type(module).__name__, kwargs.get("mode")))
        original(module, backend="eager")

    def compile_function_for_test(fn, **kwargs):
        compiled_functions.append((fn, kwargs))
        return original_function(fn, **({k: v for k, v in kwargs.items() if k != "mode"} | {"backend": "eager"}))

    monkeypatch.setattr(torch.nn.Module, "compile", compile_for_test)
    monkeypatch.setattr(torch, "compile", compile_function_for_test)
    lines: list[str] = []
    folder = train_kontext(TrainConfig(family="kontext", out_dir=tmp_path, device="cpu", batch=4, denoiser_minutes=1.0,
                                       max_denoiser_steps=2, log_every=1, workers=0, compile=True),
                           trained[0], log=lines.append, eval_edits=0)
    modules = ["CLIPTextModel", "Encoder", "FluxTransformer2DModel", "T5EncoderModel"]
    assert sorted(compiled) == [(name, "default") for name in modules]
    functions = [(fn, kwargs) for fn, kwargs in compiled_functions if not hasattr(fn, "__self__")]  # not modules
    assert functions == [(render_arrays, {"fullgraph": True, "dynamic": False, "mode": "default"})]
    assert [line.split(":")[0] for line in lines[:2]] == ["kontext step 0", "kontext step 1"]
    weights = "transformer/diffusion_pytorch_model.safetensors"
    before, after = load_file(trained[0] / weights), load_file(folder / weights)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    # --cuda-graphs: the same parts, each compiled to replay as CUDA graphs; a step begins a new graph generation.
    compiled.clear(), compiled_functions.clear()
    steps_begun = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps_begun.append(1))
    train_kontext(TrainConfig(family="kontext", out_dir=tmp_path / "graphs", device="cpu", batch=4,
                              denoiser_minutes=1.0, max_denoiser_steps=2, log_every=1, workers=0, compile=True,
                              cuda_graphs=True), trained[0], log=lambda _: None, eval_edits=0)
    assert sorted(compiled) == [(name, "reduce-overhead") for name in modules]
    assert [kwargs["mode"] for fn, kwargs in compiled_functions if fn is render_arrays] == ["reduce-overhead"]
    assert len(steps_begun) == 2

    seen = []
    monkeypatch.setattr("pipelines.demo.kontext_train.train_kontext", lambda cfg, *a, **k: seen.append(cfg.compile_mode))
    main(["--family", "kontext", "--init", str(trained[0]), "--out", str(tmp_path / "cli"), "--device", "cpu",
          "--compile"])
    main(["--family", "kontext", "--init", str(trained[0]), "--out", str(tmp_path / "cli"), "--device", "cpu"])
    main(["--family", "kontext", "--init", str(trained[0]), "--out", str(tmp_path / "cli"), "--device", "cuda",
          "--no-compile"])
    main(["--family", "kontext", "--init", str(trained[0]), "--out", str(tmp_path / "cli"), "--device", "cuda"])
    main(["--family", "kontext", "--init", str(trained[0]), "--out", str(tmp_path / "cli"), "--device", "cuda",
          "--cuda-graphs"])
    assert seen == ["default", None, None, "default", "reduce-overhead"]  # on by default for a GPU only


def test_noise_scale_recovers_a_known_gradient_noise_scale():
    """Per-example gradients G + noise with |G|^2 = 4 and tr(S) = 50 (B_noise 12.5): the exact expected squared
    norms give it back exactly, and squared norms of sampled batch means within 10%."""
    from pipelines.demo.noise_scale import noise_scale

    dims, g2, noise = 50, 4.0, 50.0
    assert noise_scale(g2 + noise / 8, g2 + noise / 64, 8, 64) == pytest.approx((g2, noise, 12.5))
    generator = torch.Generator().manual_seed(0)
    gradient = torch.full((dims,), (g2 / dims) ** 0.5)

    def mean_square(batch: int, batches: int) -> float:
        per_example = gradient + torch.randn(batches, batch, dims, generator=generator) * (noise / dims) ** 0.5
        return float((per_example.mean(1) ** 2).sum(1).mean())

    assert noise_scale(mean_square(8, 4000), mean_square(64, 4000), 8, 64)[2] == pytest.approx(12.5, rel=0.1)


def test_noise_scale_cli_measures_a_saved_editor_and_rejects_what_is_not_one(trained, tmp_path, capsys):
    from pipelines.demo.noise_scale import main

    main([str(trained[0]), "--small", "2", "--big", "4", "--small-batches", "2", "--big-batches", "1"])
    line = capsys.readouterr().out
    assert "B_noise" in line and "|G_2|^2" in line and "|G_4|^2" in line
    for argv, message in (([str(tmp_path)], "is not a saved demo-flux pipeline"),
                          ([str(trained[0]), "--small", "8", "--big", "8"], "need 0 < --small < --big")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err
