"""The Edit tab: an input image and an instruction ("make the circle blue") for a model that edits images
(FLUX.1 Kontext), the result beside the input with a before/after slider, "Use as input" to chain edits, and
the session's history. The request and its checks are the service's and the manager's, as on the other tabs.
"""
from __future__ import annotations

import time

import gradio as gr
from PIL import Image

from pipelines.registry import ModelSpec
from pipelines.request import RequestError

from .examples import example_edits, example_picture
from .formatting import fmt_ms, result_details, result_markdown
from .generate_tab import (GPU_CONCURRENCY_ID, error_status, precision_dropdown, run_once, run_with_errors,
                           sampler_choices, session_of, stop_message)
from .history import add_results, first_result, gallery_value, input_file
from .inputs import NumberSlider, Prompt, WholeNumber, WholeSlider
from .service import ModelChoice, PrismService

PREFIX = "edit"


def edit_size_info(spec: ModelSpec | None) -> str | None:
    if spec is None:
        return None
    s = spec.size
    return f"0 or blank: the input's size (resized to the model's nearest preferred size); multiple of {s.multiple_of}"


def examples_view(spec: ModelSpec | None) -> dict:
    """The example chips' samples, label and visibility for a model: at build time and when the model changes."""
    edits = example_edits(spec)
    with_pictures = any(caption for _, caption in edits)
    return dict(samples=[[text] for text, _ in edits], visible=bool(edits),
                label="Examples (click to use" + (": each brings its picture)" if with_pictures else ")"))


def build_edit_tab(service: PrismService) -> gr.Image:
    """Widgets and events of the Edit tab; call inside a `gr.Tab`. Returns its input image, which the other tabs'
    "Edit this picture" buttons fill."""
    offered = service.edit_choices()
    family = offered[0].family if offered else None
    choice, note = service.default_choice(family) if family else (None, "No image-editing model (FLUX.1 Kontext) "
                                                                        "is offered; start the app with --models naming one.")
    spec = choice.spec if choice else None

    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            model = gr.Dropdown([c.name for c in offered], value=choice.name if choice else None, label="Model",
                                elem_id=f"{PREFIX}-model")
            model_note = gr.Markdown(note, elem_id=f"{PREFIX}-model-note", elem_classes=["prism-note"])
            input_image = gr.Image(type="pil", label="Image to edit (upload or paste)", sources=["upload", "clipboard"],
                                   height=300, elem_id=f"{PREFIX}-input-image", elem_classes=["prism-input"])
            instruction = Prompt(label="Instruction", lines=2, max_lines=6, placeholder="What to change, e.g. "
                                 "\"make the circle blue\"", elem_id=f"{PREFIX}-instruction")
            with gr.Row():
                button = gr.Button("Edit", variant="primary", elem_id=f"{PREFIX}-run", scale=3)
                stop = gr.Button("Stop", variant="stop", elem_id=f"{PREFIX}-stop", scale=1)
            status = gr.Markdown("", label="Status", elem_id=f"{PREFIX}-status", elem_classes=["prism-status"])
            # type="index": a click hands over the example's number, so one that brings a picture can load it too.
            examples = gr.Dataset(components=[instruction], type="index", elem_id=f"{PREFIX}-examples",
                                  **examples_view(spec))
            with gr.Accordion("Settings", open=False, elem_id=f"{PREFIX}-settings"):
                with gr.Row():
                    width = WholeNumber(None, precision=0, label="Width", info=edit_size_info(spec),
                                        elem_id=f"{PREFIX}-width")
                    height = WholeNumber(None, precision=0, label="Height", info=edit_size_info(spec),
                                         elem_id=f"{PREFIX}-height")
                steps = WholeSlider(1, spec.max_steps if spec else 100, spec.default_steps if spec else 28, step=1,
                                    precision=0, label="Steps", elem_id=f"{PREFIX}-steps")
                guidance = NumberSlider(0, spec.max_guidance if spec else 30, spec.default_guidance if spec else 2.5,
                                        step=0.1, label="Guidance", elem_id=f"{PREFIX}-guidance")
                with gr.Row():
                    with gr.Column(min_width=160):
                        seed = WholeNumber(-1, precision=0, label="Seed", info="-1: random (the seed used is reported)",
                                           elem_id=f"{PREFIX}-seed")
                        reuse = gr.Button("Reuse last seed", size="sm", elem_id=f"{PREFIX}-reuse-seed")
                    num_images = WholeSlider(1, spec.max_images if spec else 8, 1, step=1, precision=0,
                                             label="Number of edits", elem_id=f"{PREFIX}-num-images")
                with gr.Row():
                    with gr.Column(min_width=200):
                        precision, _ = precision_dropdown(service, f"{PREFIX}-precision")
                    sampler = gr.Dropdown(sampler_choices(spec, family) if family else [("Model default", "")],
                                          value="", label="Sampler", elem_id=f"{PREFIX}-sampler")
        with gr.Column(scale=3):
            # Drag the divider: the input (at the result's size) on the left, the first edit on the right.
            slider = gr.ImageSlider(label="Before / after", type="pil", interactive=False, height=420,
                                    elem_id=f"{PREFIX}-slider", elem_classes=["prism-compare"])
            use_result = gr.Button("Use as input (chain another edit)", size="sm", elem_id=f"{PREFIX}-use-result")
            gallery = gr.Gallery(label="Edits", columns=4, format="png", elem_id=f"{PREFIX}-gallery",
                                 elem_classes=["prism-images"], object_fit="contain", height=200, rows=1,
                                 buttons=["download", "fullscreen"], interactive=False)
            used_seed = gr.Number(None, label="Seed used", precision=0, interactive=False, visible="hidden",
                                  elem_id=f"{PREFIX}-seed-used")
            summary = gr.Markdown("", label="Summary", elem_id=f"{PREFIX}-summary")
            files = gr.File(label="PNG files (with edit settings in their metadata)", file_count="multiple",
                            interactive=False, elem_id=f"{PREFIX}-files")
            with gr.Accordion("Details (JSON)", open=False):
                details = gr.JSON(label="Details", elem_id=f"{PREFIX}-details")
    with gr.Accordion("History of this session (click an edit, then reuse its settings or edit it further)", open=True):
        history_gallery = gr.Gallery(label="History", columns=8, height=200, object_fit="contain", format="png",
                                     allow_preview=False,  # a click picks an edit (as on the other tabs)
                                     elem_id=f"{PREFIX}-history", elem_classes=["prism-history"],
                                     buttons=["download", "fullscreen"], interactive=False)
        with gr.Row():
            reuse_settings = gr.Button("Reuse settings", size="sm", elem_id=f"{PREFIX}-history-settings")
            use_as_input = gr.Button("Use as input", size="sm", elem_id=f"{PREFIX}-history-input")
            picked_note = gr.Markdown("Nothing picked yet.", elem_id=f"{PREFIX}-history-picked")
    history = gr.State([])  # HistoryItems, newest first (one list per browser session)
    picked = gr.State(None)

    def editor(name: str) -> ModelChoice:
        for c in offered:
            if c.name == name:
                return c
        names = ", ".join(c.name for c in offered) or "none is offered here"
        raise RequestError(f"Unknown editing model {name!r}; choose one of: {names}.")

    def on_model(name: str):
        s = editor(name).spec
        return [service.model_note(editor(name)), gr.update(value=None, info=edit_size_info(s)),
                gr.update(value=None, info=edit_size_info(s)), gr.update(maximum=s.max_steps, value=s.default_steps),
                gr.update(maximum=s.max_guidance, value=s.default_guidance), gr.update(maximum=s.max_images, value=1),
                gr.update(choices=sampler_choices(s, s.family), value=""),
                gr.update(**examples_view(s))]

    model.input(run_once(on_model), model, [model_note, width, height, steps, guidance, num_images, sampler, examples],
                api_visibility="undocumented", concurrency_limit=None, show_progress="hidden")

    def use_example(index: int, name: str):
        text, caption = example_edits(editor(name).spec)[index]
        return text, example_picture(caption) if caption else gr.update()

    examples.click(use_example, [examples, model], [instruction, input_image], api_visibility="private",
                   concurrency_limit=None, show_progress="hidden")

    outputs = [slider, gallery, files, used_seed, summary, details, status]
    cleared = (None, None, None, None, "", None)

    @run_with_errors(len(outputs), cleared)
    def edit_image(model, instruction, input_image=None, width=None, height=None, steps=None, guidance=None,
                   seed=-1, num_images=1, precision=None, sampler="", request: gr.Request = None,
                   progress=gr.Progress()):
        c = editor(model)
        # The browser sends an empty number box as 0: both mean "the input's size".
        width, height = (None if v in (0, "0") else v for v in (width, height))
        job = service.build_request(c.family, c.name, instruction, None, width, height, steps, guidance, seed,
                                    num_images, precision, sampler, image=input_image)
        started = time.perf_counter()
        task = service.start_generate(job, session=session_of(request))
        try:
            for text, fraction in task.views():  # to the progress bar only (see generate_tab)
                progress(fraction, desc=text)
            result = task.result()
        finally:
            if not task.finished:
                task.cancel()
        paths = [str(path) for path in service.save_result(result)]
        after = result.images[0]
        # Display only: the input drawn at the result's size so the divider compares the same places.
        before = input_image.convert("RGB").resize(after.size, Image.Resampling.LANCZOS)
        done = (f"Done: {len(paths)} edit{'s' if len(paths) > 1 else ''} in "
                f"{fmt_ms((time.perf_counter() - started) * 1000)} (including any wait and loading)")
        yield ((before, after), [(p, f"seed {sd}") for p, sd in zip(paths, result.seeds)], paths, result.seeds[0],
               result_markdown(result), result_details(result, c.name, paths), done)

    inputs = [model, instruction, input_image, width, height, steps, guidance, seed, num_images, precision, sampler]
    event = button.click(None, None, status, js="() => ''", queue=False).then(
        edit_image, inputs, outputs, api_name="edit_image", concurrency_id=GPU_CONCURRENCY_ID,
        show_progress_on=[slider, status])

    quiet = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")
    reuse.click(lambda last: -1 if last is None else last, used_seed, seed, **quiet)

    use_result.click(lambda paths: first_result(paths, "Make an edit first."), files, input_image, **quiet)

    def remember(past, new_files, new_details):
        items = add_results(past, new_files, new_details)
        return items, gallery_value(items)

    def pick(past, evt: gr.SelectData):
        item = past[evt.index] if past and 0 <= evt.index < len(past) else None
        return item, (f"Picked: seed {item.seed}, \"{item.settings.get('prompt', '')}\"" if item
                      else "Nothing picked yet.")

    def settings_of(item):
        if item is None:
            raise gr.Error("Click an edit in the history first.", print_exception=False)
        s = item.settings
        return [s.get("model"), s.get("prompt", ""), gr.skip(),  # the input image is not in the PNG, only its hash
                s.get("width"), s.get("height"), s.get("steps"), s.get("guidance"), item.seed, s.get("num_images", 1),
                s.get("precision"), s.get("sampler", "")]

    def input_of(item):
        return input_file(item, "an edit")

    event.success(remember, [history, files, details], [history, history_gallery], **quiet)
    history_gallery.select(pick, history, [picked, picked_note], **quiet)
    reuse_settings.click(settings_of, picked, inputs, **quiet)
    use_as_input.click(input_of, picked, input_image, **quiet)

    def stop_job(request: gr.Request = None):
        return error_status(stop_message(service.cancel_session(session_of(request))))

    stop.click(stop_job, None, status, cancels=[event], api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
    return input_image
