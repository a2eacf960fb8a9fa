"""The Flux.1 and SDXL tabs: one builder, the family decides the few differences (negative prompt).

Layout: what to type and the Generate / Stop buttons with the status line right under them come first, so
they stay in view at 1280x720; the settings follow; the results sit in the right-hand column.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import gradio as gr

from pipelines.families import FAMILIES
from pipelines.image_input import ONLY_MASKED_PADDING
from pipelines.registry import Family, ModelSpec
from pipelines.request import DEFAULT_MASK_BLUR, DEFAULT_REFINER_SWITCH, DEFAULT_STRENGTH, MAX_MASK_BLUR
from pipelines.schedulers import recorded_name, sampler_names

from .errors import ui_error
from .examples import empty_prompt_hint, example_prompts
from .history import add_results, gallery_value, input_file
from .formatting import fmt_ms, precision_info, precision_label, result_details, result_markdown
from .input_image import image_and_mask
from .inputs import NumberSlider, Prompt, WholeNumber, WholeSlider
from .lora_picker import build_lora_picker, chosen_loras, row_values
from .service import PRECISION_ORDER, ModelChoice, PrismService

GPU_CONCURRENCY_ID = "prism-gpu"  # every event that submits jobs shares one Gradio concurrency limit


def size_info(spec: ModelSpec) -> str:
    s = spec.size
    return (f"multiple of {s.multiple_of}, {s.min_side} to {s.max_side}; blank: {spec.default_width}, "
            "or an input image's shape")


def precision_dropdown(service: PrismService, elem_id: str) -> tuple[gr.Dropdown, gr.Markdown]:
    default = service.default_precision()
    dropdown = gr.Dropdown([(precision_label(service.support(p)), p.value) for p in PRECISION_ORDER],
                           value=default.value, label="Precision", elem_id=elem_id)
    info = gr.Markdown(precision_info(service.support(default)), elem_id=f"{elem_id}-info")
    dropdown.change(lambda p: precision_info(service.support(p)), dropdown, info, api_visibility="private",
                    concurrency_limit=None, show_progress="hidden")
    return dropdown, info


def error_status(message: str) -> str:
    return f"⚠ **{message}**"


def run_with_errors(n_outputs: int, cleared: tuple = ()):
    """For a generator handler whose last output is its status line: an error is shown as one readable
    message there and in a toast, never as a stack trace; through the API it arrives as the error text.
    The other outputs get `cleared` (so a previous result is not taken for this run's), or stay as they are."""

    def decorate(fn):
        @functools.wraps(fn)  # Gradio reads the signature (its gr.Progress and gr.Request parameters) through this
        def wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                error = ui_error(exc, fn.__name__)
                yield (*(cleared or (gr.skip(),) * (n_outputs - 1)), error_status(error.message))
                raise error from None

        return wrapper

    return decorate


def cached_label(family: Family, spec: ModelSpec | None) -> str:
    """The "Fast (cached)" switch: what the family's schedule does at the model's default steps."""
    steps = spec.default_steps if spec else 28
    return f"Fast (cached): {FAMILIES[family].fast_cache.describe(steps)}; the image changes a little"


def build_generate_tab(service: PrismService, family: Family) -> tuple[gr.Button, gr.File]:
    """Widgets and events for one family's tab; call inside a `gr.Tab`. Returns its "Edit this picture" button
    and the result files it sends, for the caller to wire to the Edit tab."""
    prefix = family.value
    choice, note = service.default_choice(family)
    spec = choice.spec if choice else None
    sdxl = FAMILIES[family].negative_prompt  # SDXL's layout: a family whose loop takes a negative prompt

    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            model = gr.Dropdown([c.name for c in service.choices(family)], value=choice.name if choice else None,
                                label="Model", elem_id=f"{prefix}-model")
            model_note = gr.Markdown(note, elem_id=f"{prefix}-model-note", elem_classes=["prism-note"])
            prompt = Prompt(label="Prompt", lines=2, max_lines=6, placeholder="What to draw",
                            elem_id=f"{prefix}-prompt")
            negative = None
            if sdxl:
                negative = Prompt("", label="Negative prompt", lines=1, max_lines=4, elem_id=f"{prefix}-negative",
                                  interactive=bool(spec and spec.supports_negative_prompt),
                                  placeholder=_negative_placeholder(spec))
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-generate", scale=3)
                stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop", scale=1)
            status = gr.Markdown("", label="Status", elem_id=f"{prefix}-status", elem_classes=["prism-status"])
            examples = gr.Dataset(components=[prompt], label="Examples (click to use)",
                                  samples=[[p] for p in example_prompts(spec)], elem_id=f"{prefix}-examples",
                                  samples_per_page=6)
            with gr.Row():
                width = WholeNumber(spec.default_width if spec else None, precision=0, label="Width",
                                    info=size_info(spec) if spec else None, elem_id=f"{prefix}-width")
                height = WholeNumber(spec.default_height if spec else None, precision=0, label="Height",
                                     info=size_info(spec) if spec else None, elem_id=f"{prefix}-height")
            steps = WholeSlider(1, spec.max_steps if spec else 100, spec.default_steps if spec else 28,
                                step=1, precision=0, label="Steps", elem_id=f"{prefix}-steps")
            guidance = NumberSlider(0, spec.max_guidance if spec else 30, spec.default_guidance if spec else 3.5,
                                    step=0.1, label="Guidance", elem_id=f"{prefix}-guidance")
            with gr.Row():
                with gr.Column(min_width=160):
                    seed = WholeNumber(-1, precision=0, label="Seed", info="-1: random (the seed used is reported)",
                                       elem_id=f"{prefix}-seed")
                    reuse = gr.Button("Reuse last seed", size="sm", elem_id=f"{prefix}-reuse-seed")
                num_images = WholeSlider(1, spec.max_images if spec else 8, 1, step=1, precision=0,
                                         label="Number of images",
                                         elem_id=f"{prefix}-num-images")
            with gr.Row():
                with gr.Column(min_width=200):
                    precision, _ = precision_dropdown(service, f"{prefix}-precision")
                sampler = gr.Dropdown(sampler_choices(spec, family), value="", label="Sampler",
                                      info="recorded in each PNG as A1111 does", elem_id=f"{prefix}-sampler")
            cached = gr.Checkbox(False, label=cached_label(family, spec), elem_id=f"{prefix}-cached")
            refiner_row = refiner_on = refiner_switch = None
            if sdxl:  # shown for models that name a refiner (sdxl-base-1.0)
                with gr.Row(visible=bool(spec and spec.refiner), elem_id=f"{prefix}-refiner-row") as refiner_row:
                    refiner_on = gr.Checkbox(False, label=refiner_label(spec), elem_id=f"{prefix}-refiner",
                                             info="finishes the last steps from the base's latents")
                    refiner_switch = NumberSlider(0.05, 0.95, DEFAULT_REFINER_SWITCH, step=0.05, label="Hand-off at",
                                                  info="the base runs this fraction of the steps",
                                                  elem_id=f"{prefix}-refiner-switch")
            with gr.Accordion("Input image (image to image, inpainting)", open=False,
                              elem_id=f"{prefix}-input-box") as input_box:
                gr.Markdown("The input is scaled to cover the width x height above (clear both to keep its shape) "
                            "and its centre is kept. Paint over it to repaint only there (inpainting); the rest of "
                            "the picture stays as it was.",
                            elem_classes=["prism-note"])
                input_image = gr.ImageEditor(type="pil", label="Input image (upload or paste; paint a mask)",
                                             sources=["upload", "clipboard"], layers=False, transforms=(),
                                             brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                             elem_id=f"{prefix}-input-image")
                with gr.Row():
                    strength = NumberSlider(0.05, 1, DEFAULT_STRENGTH, step=0.05, label="Strength",
                                            info="how much is repainted: 0 keeps the input, 1 ignores it",
                                            elem_id=f"{prefix}-strength")
                    mask_blur = WholeSlider(0, MAX_MASK_BLUR, DEFAULT_MASK_BLUR, step=1, precision=0,
                                            label="Mask blur (pixels)", elem_id=f"{prefix}-mask-blur")
                only_masked = gr.Checkbox(False, label=f"Only masked: repaint the masked region (with "
                                                       f"{ONLY_MASKED_PADDING} px around it) at the full size",
                                          elem_id=f"{prefix}-only-masked")
            loras = build_lora_picker(service, prefix)
        with gr.Column(scale=3):
            # contain, not cover: the whole picture is always visible; small ones are scaled up with
            # nearest-neighbour for display only (see PRISM_CSS); the PNG files keep their real size.
            gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id=f"{prefix}-gallery",
                                 elem_classes=["prism-images"], object_fit="contain", height=440, rows=1,
                                 buttons=["download", "fullscreen"], interactive=False)
            # The first picture into the Edit tab (blocks.py wires it: it holds both tabs), where a model edits.
            send_to_edit = gr.Button("Edit this picture (Edit tab)", size="sm", elem_id=f"{prefix}-send-to-edit",
                                     visible=bool(service.edit_choices()))
            # For the API (the summary shows seeds to people): Gradio draws an empty Number as 0, which would mislead.
            used_seed = gr.Number(None, label="Seed used", precision=0, interactive=False, visible="hidden",
                                  elem_id=f"{prefix}-seed-used")
            summary = gr.Markdown("", label="Summary", elem_id=f"{prefix}-summary")
            files = gr.File(label="PNG files (with generation settings in their metadata)", file_count="multiple",
                            interactive=False, elem_id=f"{prefix}-files")
            with gr.Accordion("Details (JSON)", open=False):
                details = gr.JSON(label="Details", elem_id=f"{prefix}-details")
    with gr.Accordion("History of this session (click an image, then reuse its settings or seed)", open=True):
        # allow_preview=False: a click picks a thumbnail (and highlights it) instead of opening Gradio's preview,
        # which showed the picked image enlarged and cropped over a blurred copy of the strip.
        history_gallery = gr.Gallery(label="History", columns=8, height=200, object_fit="contain", format="png",
                                     allow_preview=False,
                                     elem_id=f"{prefix}-history", elem_classes=["prism-history"],
                                     buttons=["download", "fullscreen"], interactive=False)
        with gr.Row():
            reuse_settings = gr.Button("Reuse settings", size="sm", elem_id=f"{prefix}-history-settings")
            reuse_history_seed = gr.Button("Reuse seed", size="sm", elem_id=f"{prefix}-history-seed")
            use_as_input = gr.Button("Use as input", size="sm", elem_id=f"{prefix}-history-input")
            picked_note = gr.Markdown("Nothing picked yet.", elem_id=f"{prefix}-history-picked")
    history = gr.State([])  # HistoryItems, newest first (one list per browser session)
    # The picked HistoryItem; an image-to-image input reads its `image_for_input` ("use as input").
    picked = gr.State(None)

    def on_model(name: str):
        c: ModelChoice = service.choice(name, family)
        s = c.spec
        updates = [service.model_note(c), gr.update(value=s.default_width, info=size_info(s)),
                   gr.update(value=s.default_height, info=size_info(s)),
                   gr.update(maximum=s.max_steps, value=s.default_steps),
                   gr.update(maximum=s.max_guidance, value=s.default_guidance),
                   gr.update(maximum=s.max_images, value=1), gr.update(samples=[[p] for p in example_prompts(s)]),
                   gr.update(choices=sampler_choices(s, family), value=""), gr.update(label=cached_label(family, s))]
        if sdxl:
            negative_update = dict(interactive=s.supports_negative_prompt, placeholder=_negative_placeholder(s))
            if not s.supports_negative_prompt:
                negative_update["value"] = ""  # a hidden leftover would make the request fail
            updates.append(gr.update(**negative_update))
            # A hidden, checked leftover would make the request fail: the switch goes off with the row.
            updates += [gr.update(visible=bool(s.refiner)),
                        gr.update(label=refiner_label(s)) if s.refiner else gr.update(value=False)]
        return updates

    model.input(run_once(on_model), model,
                [model_note, width, height, steps, guidance, num_images, examples, sampler, cached]
                + ([negative, refiner_row, refiner_on] if sdxl else []),
                api_visibility="undocumented", concurrency_limit=None, show_progress="hidden")
    examples.click(lambda sample: sample[0], examples, prompt, api_visibility="private", concurrency_limit=None,
                   show_progress="hidden")

    outputs = [gallery, files, used_seed, summary, details, status]
    cleared = (None, None, None, "", None)  # after an error no earlier result stays on show as if it were new

    def run(session: str | None, model_name, prompt_text, negative_text, w, h, n_steps, g, s, n, p, sampler_name,
            editor, strength_value, blur, only, lora_values, fast, refiner_value, progress):
        if not (prompt_text or "").strip():
            raise gr.Error(empty_prompt_hint(service.choice(model_name, family).spec), print_exception=False)
        image, mask = image_and_mask(editor)
        request = service.build_request(family, model_name, prompt_text, negative_text, w, h, n_steps, g, s, n, p,
                                        sampler_name, image, strength_value, mask, blur, only,
                                        chosen_loras(lora_values), refiner_value, cache=fast)
        name = service.choice_for(request).name
        started = time.perf_counter()
        task = service.start_generate(request, session=session)
        try:
            # Progress goes to Gradio's progress bar only: a yielded update would end the bar (Gradio shows a
            # generator's later work as "streaming", without progress).
            for text, fraction in task.views():
                progress(fraction, desc=text)
            result = task.result()
        finally:
            if not task.finished:  # the browser went away or the event was cancelled: stop the job too
                task.cancel()
        paths = [str(path) for path in service.save_result(result)]
        done = (f"Done: {len(paths)} image{'s' if len(paths) > 1 else ''} in "
                f"{fmt_ms((time.perf_counter() - started) * 1000)} (including any wait and loading)")
        yield ([(path, f"seed {sd}") for path, sd in zip(paths, result.seeds)], paths, result.seeds[0],
               result_markdown(result), result_details(result, name, paths), done)

    # Two explicit signatures (rather than *args) so the API lists every parameter by name (and each LoRA row).
    assert len(loras.names) == 2, "the signatures below name two LoRA rows"
    if sdxl:
        @run_with_errors(len(outputs), cleared)
        def generate_sdxl(model, prompt, negative_prompt="", width=None, height=None, steps=None, guidance=None,
                          seed=-1, num_images=1, precision=None, sampler="", input_image=None,
                          strength=DEFAULT_STRENGTH, mask_blur=DEFAULT_MASK_BLUR, only_masked=False, lora="",
                          lora_scale=1.0, lora_2="", lora_2_scale=1.0, cached=False, refiner=False,
                          refiner_switch=DEFAULT_REFINER_SWITCH, request: gr.Request = None, progress=gr.Progress()):
            yield from run(session_of(request), model, prompt, negative_prompt, width, height, steps, guidance, seed,
                           num_images, precision, sampler, input_image, strength, mask_blur, only_masked,
                           (lora, lora_scale, lora_2, lora_2_scale), cached,
                           (DEFAULT_REFINER_SWITCH if refiner_switch in (None, "") else refiner_switch)
                           if refiner else None, progress)
        generate = generate_sdxl
    else:
        @run_with_errors(len(outputs), cleared)
        def generate_flux(model, prompt, width=None, height=None, steps=None, guidance=None, seed=-1, num_images=1,
                          precision=None, sampler="", input_image=None, strength=DEFAULT_STRENGTH,
                          mask_blur=DEFAULT_MASK_BLUR, only_masked=False, lora="", lora_scale=1.0, lora_2="",
                          lora_2_scale=1.0, cached=False, request: gr.Request = None, progress=gr.Progress()):
            yield from run(session_of(request), model, prompt, "", width, height, steps, guidance, seed, num_images,
                           precision, sampler, input_image, strength, mask_blur, only_masked,
                           (lora, lora_scale, lora_2, lora_2_scale), cached, None, progress)
        generate = generate_flux

    inputs = [model, prompt] + ([negative] if sdxl else []) + [width, height, steps, guidance, seed, num_images,
                                                                precision, sampler, input_image, strength, mask_blur,
                                                                only_masked, *loras.inputs, cached] \
        + ([refiner_on, refiner_switch] if sdxl else [])
    # The last run's status line goes at once, in the browser, so a stale "Done" or error never describes this run.
    event = button.click(None, None, status, js="() => ''", queue=False).then(
        generate, inputs, outputs, api_name=f"generate_{prefix}", concurrency_id=GPU_CONCURRENCY_ID,
        show_progress_on=[gallery, status])

    reuse.click(lambda last: -1 if last is None else last, used_seed, seed, api_visibility="private",
                concurrency_limit=None, show_progress="hidden")

    def remember(past, new_files, new_details):
        items = add_results(past, new_files, new_details)
        return items, gallery_value(items)

    def pick(past, evt: gr.SelectData):
        item = past[evt.index] if past and 0 <= evt.index < len(past) else None
        return item, (f"Picked: seed {item.seed}, {item.settings.get('width')}x{item.settings.get('height')}, "
                      f"{item.settings.get('steps')} steps" if item else "Nothing picked yet.")

    def settings_of(item):
        if item is None:
            raise gr.Error("Click an image in the history first.", print_exception=False)
        s = item.settings
        values = [s.get("model"), s.get("prompt", "")] + ([s.get("negative_prompt", "")] if sdxl else []) + \
            [s.get("width"), s.get("height"), s.get("steps"), s.get("guidance"), item.seed, s.get("num_images", 1),
             s.get("precision"), s.get("sampler", ""), gr.skip(),  # the input image is not in the PNG, only its hash
             s.get("strength") or DEFAULT_STRENGTH, s.get("mask_blur", DEFAULT_MASK_BLUR), s.get("only_masked", False),
             *row_values(s.get("loras")), s.get("cache") == "fast"] + \
            ([s.get("refiner") is not None, s.get("refiner") or DEFAULT_REFINER_SWITCH] if sdxl else [])
        return values

    def input_of(item):
        # Opened, so the user sees the picture the next Generate starts from (closed, nothing on screen changed).
        return input_file(item, "an image"), gr.Accordion(open=True)

    def seed_of(item):
        if item is None:
            raise gr.Error("Click an image in the history first.", print_exception=False)
        return item.seed

    quiet = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
    event.success(remember, [history, files, details], [history, history_gallery], **quiet)
    history_gallery.select(pick, history, [picked, picked_note], **quiet)
    reuse_settings.click(settings_of, picked, inputs, **quiet)
    reuse_history_seed.click(seed_of, picked, seed, **quiet)
    use_as_input.click(input_of, picked, [input_image, input_box], **quiet)

    def stop_job(request: gr.Request = None):
        return error_status(stop_message(service.cancel_session(session_of(request))))

    stop.click(stop_job, None, status, cancels=[event], api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
    return send_to_edit, files


def stop_message(stage: str | None) -> str:
    """What Stop did, given the stage the job was in (None: nothing was running)."""
    if stage is None:
        return "Nothing to stop."
    if stage == "download":  # every chunk checks Stop (pipelines/downloads.py)
        return ("Stopped the download. What has arrived stays in the Hugging Face cache; the next job resumes "
                "from there.")
    if stage in ("load", "build"):  # a load or engine build runs to its end; the job stops right after it
        return ("Stopping: the model is still loading and will finish loading first (it stays loaded for the next "
                "job); then the job stops.")
    return "Stopped."


def sampler_choices(spec: ModelSpec | None, family: Family) -> list[tuple[str, str]]:
    """The model's own scheduler first (by its A1111 name), then every sampler of the family."""
    own = spec.components.get("scheduler") if spec else None
    default = recorded_name("", own.class_name if own else "")
    return [(f"Model default ({default})", "")] + [(name, name) for name in sampler_names(family)]


def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def run_once(fn):
    """A plain (non-generator) handler whose errors show as messages, for small events."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except Exception as exc:
            raise ui_error(exc, fn.__name__) from None

    return wrapper


def refiner_label(spec: ModelSpec | None) -> str:
    """The switch's label names the refiner (a local base names a folder; its name is enough)."""
    name = Path(spec.refiner).name if spec and spec.refiner else "refiner"
    return f"Refiner ({name})"


def _negative_placeholder(spec: ModelSpec | None) -> str:
    if spec is None or spec.supports_negative_prompt:
        return "What to avoid (acts when guidance is above 1)"
    return f"{spec.id} does not use a negative prompt"
