"""The Compare tab: one prompt and seed at 16-bit, FP8 and FP4 side by side, with the figures under each."""
from __future__ import annotations

import time

import gradio as gr
import numpy as np
from PIL import Image

from pipelines.compare import CACHED, CHOICES, SIXTEEN_BIT, Comparison, reference_precision
from pipelines.imagemetrics import HEATMAP_FULL_SCALE, difference_heatmap
from pipelines.precision import Precision
from pipelines.registry import Family
from pipelines.request import DEFAULT_STRENGTH, GenerationRequest, RequestError

from .examples import empty_prompt_hint
from .formatting import comparison_markdown, compare_figures, fmt_ms, precision_info
from .generate_tab import (GPU_CONCURRENCY_ID, error_status, run_once, run_with_errors, session_of, size_info,
                           stop_message)
from .inputs import NumberSlider, Prompt, WholeNumber, WholeSlider
from .lora_picker import build_lora_picker, chosen_loras
from .service import PrismService

COLUMNS = ((SIXTEEN_BIT, "16-bit"), (Precision.FP8.value, "FP8"), (Precision.FP4.value, "FP4"),
           (CACHED, "16-bit, fast (cached)"))


def sixteen_bit_note(service: PrismService, choice) -> str:
    """What "16-bit" means for the chosen model on this machine: the precision that will actually run."""
    if choice is None:
        return ""
    ref = reference_precision(choice.spec, service.capability)
    return (f"**16-bit** for {choice.name} here is **{ref.label}**: the precision FP8 and FP4 compute in, so the "
            "differences shown are those of quantization alone. Latency is the warm work (text encoders, denoising, "
            "VAE; the columns share one encoding of the prompt, counted in each); first-use loading and engine builds "
            "are shown apart.")


def heatmap_legend(width: int = 256, height: int = 16) -> Image.Image:
    """The heat maps' colour scale, drawn by the heat-map function itself from a left-to-right ramp."""
    ramp = np.repeat(np.linspace(0, HEATMAP_FULL_SCALE, width)[None, :, None], height, axis=0).repeat(3, axis=2)
    return difference_heatmap(np.zeros_like(ramp), ramp)


def build_compare_tab(service: PrismService) -> None:
    choices = service.choices()
    first = next((c for c in (service.default_choice(f)[0] for f in Family) if c), None)
    spec = first.spec if first else None

    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            model = gr.Dropdown([(f"{c.name} ({c.family.value.upper()})", c.name) for c in choices],
                                value=first.name if first else None, label="Model", elem_id="compare-model")
            prompt = Prompt(label="Prompt", lines=2, placeholder="What to draw", elem_id="compare-prompt")
            with gr.Row():
                seed = WholeNumber(-1, precision=0, label="Seed", info="-1: random; one seed for every precision",
                                 elem_id="compare-seed")
                precisions = gr.CheckboxGroup([(label, value) for value, label in COLUMNS], value=list(CHOICES),
                                              label="Precisions", elem_id="compare-precisions")
            with gr.Accordion("Size, steps and guidance", open=False):
                with gr.Row():
                    width = WholeNumber(spec.default_width if spec else None, precision=0, label="Width",
                                      info=size_info(spec) if spec else None, elem_id="compare-width")
                    height = WholeNumber(spec.default_height if spec else None, precision=0, label="Height",
                                       info=size_info(spec) if spec else None, elem_id="compare-height")
                with gr.Row():
                    steps = WholeSlider(1, spec.max_steps if spec else 100, spec.default_steps if spec else 28,
                                      step=1, precision=0, label="Steps", elem_id="compare-steps")
                    guidance = NumberSlider(0, spec.max_guidance if spec else 30,
                                         spec.default_guidance if spec else 3.5, step=0.1, label="Guidance",
                                         elem_id="compare-guidance")
            with gr.Accordion("Input image (image to image; the image an edit model changes)", open=False):
                with gr.Row():
                    input_image = gr.Image(type="pil", label="Input image (image to image: scaled to cover the size, "
                                                             "centre kept; an edit model takes it at its preferred size)",
                                           sources=["upload", "clipboard"], height=200, elem_id="compare-input-image",
                                           elem_classes=["prism-input"])
                    strength = NumberSlider(0.05, 1, DEFAULT_STRENGTH, step=0.05, label="Strength",
                                            info="0 keeps the input, 1 ignores it", elem_id="compare-strength")
            loras = build_lora_picker(service, "compare")
            with gr.Row():
                button = gr.Button("Compare", variant="primary", elem_id="compare-run", scale=3)
                stop = gr.Button("Stop", variant="stop", elem_id="compare-stop", scale=1)
        with gr.Column(scale=2):
            gr.Markdown("\n\n".join(precision_info(service.support(p))
                                    for p in (service.default_precision(), Precision.FP8, Precision.FP4)),
                        elem_id="compare-precision-info")
            sixteen = gr.Markdown(sixteen_bit_note(service, first), elem_id="compare-16bit-note")

    status = gr.Markdown("", label="Status", elem_id="compare-status", elem_classes=["prism-status"])
    images, heatmaps, figures = [], [], []
    with gr.Row(equal_height=False):
        for value, label in COLUMNS:
            key = "16bit" if value == SIXTEEN_BIT else value
            with gr.Column(elem_id=f"compare-col-{key}", min_width=200):
                # One display height for every column, so the images line up whatever their size.
                images.append(gr.Image(label=label, type="filepath", format="png", interactive=False, height=420,
                                       elem_id=f"compare-image-{key}", buttons=["download", "fullscreen"],
                                       elem_classes=["prism-compare"]))
                figures.append(gr.Markdown("", label=f"{label} figures", elem_id=f"compare-figures-{key}"))
                # The 16-bit column is the reference: its map would always be empty, so it is kept (the API's
                # outputs stay in place) but not shown.
                heatmaps.append(gr.Image(label=f"{label}: difference from 16-bit", type="pil", format="png",
                                         interactive=False, height=420, elem_id=f"compare-heatmap-{key}",
                                         elem_classes=["prism-compare"], visible=value != SIXTEEN_BIT))
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            # Drag the divider: the 16-bit image on the left, the chosen precision on the right, same pixels.
            slider = gr.ImageSlider(label="Before / after: 16-bit | FP4", type="filepath", interactive=False,
                                    height=480, elem_id="compare-slider", elem_classes=["prism-compare"])
        with gr.Column(scale=2):
            against = gr.Radio([("FP8", Precision.FP8.value), ("FP4", Precision.FP4.value), ("Fast (cached)", CACHED)],
                               value=Precision.FP4.value,
                               label="Slider compares 16-bit with", elem_id="compare-slider-choice")
            gr.Image(heatmap_legend(), label=f"Heat-map scale: difference per pixel, 0 (black) to "
                                             f"{HEATMAP_FULL_SCALE:.0f}/255 or more (pale yellow)",
                     type="pil", format="png", interactive=False, height=90, elem_id="compare-legend",
                     buttons=[], elem_classes=["prism-compare"])
    paths_state = gr.State({})  # precision value -> PNG path of the last comparison, for the slider
    used_seed = gr.Number(None, label="Seed used", precision=0, interactive=False, visible="hidden",
                          elem_id="compare-seed-used")  # for the API; the summary shows it to people
    summary = gr.Markdown("", label="Summary", elem_id="compare-summary")
    with gr.Accordion("Figures (JSON)", open=False):
        details = gr.JSON(label="Comparison", elem_id="compare-details")

    def on_model(name: str):
        c = service.choice(name)
        s = c.spec
        return [gr.update(value=s.default_width, info=size_info(s)), gr.update(value=s.default_height, info=size_info(s)),
                gr.update(maximum=s.max_steps, value=s.default_steps),
                gr.update(maximum=s.max_guidance, value=s.default_guidance), sixteen_bit_note(service, c)]

    model.input(run_once(on_model), model, [width, height, steps, guidance, sixteen], api_visibility="undocumented",
                 concurrency_limit=None, show_progress="hidden")

    def slide(paths: dict, other: str):
        reference = paths.get("reference")
        label = (f"Before / after: {Precision(reference).label if reference else '16-bit'} | "
                 f"{'fast (cached)' if other == CACHED else Precision(other).label}")
        if not reference or not paths.get(other):
            return gr.update(value=None, label=label + " (not run)")
        return gr.update(value=(paths[reference], paths[other]), label=label)

    against.change(slide, [paths_state, against], slider, api_visibility="private", concurrency_limit=None,
                   show_progress="hidden")

    outputs = [*images, *heatmaps, *figures, used_seed, summary, details, paths_state, status]  # status last

    assert len(loras.names) == 2, "compare() names two LoRA rows"

    @run_with_errors(len(outputs))
    def compare(model, prompt, seed=-1, precisions=CHOICES, width=None, height=None, steps=None, guidance=None,
                input_image=None, strength=DEFAULT_STRENGTH, lora="", lora_scale=1.0, lora_2="", lora_2_scale=1.0,
                request: gr.Request = None, progress=gr.Progress()):
        choice = service.choice(model)
        if not (prompt or "").strip():  # as the other tabs and the API: nothing is drawn from an empty prompt
            raise RequestError(empty_prompt_hint(choice.spec, examples_shown=False))
        if not precisions:
            labels = [f'"{label}"' for _, label in COLUMNS]  # quoted: one label has a comma of its own
            raise RequestError(f"Select at least one precision to compare: {', '.join(labels[:-1])} or {labels[-1]}.")
        job_request = GenerationRequest(prompt=prompt, model=choice.model,
                                        seed=None if seed in (None, -1) else seed,
                                        width=width, height=height, steps=steps, guidance=guidance, image=input_image,
                                        strength=service.strength_for(choice, input_image, strength),
                                        loras=chosen_loras((lora, lora_scale, lora_2, lora_2_scale)))
        started = time.perf_counter()
        task = service.start_compare(job_request, list(precisions), session=session_of(request))
        try:
            for text, fraction in task.views():  # to the progress bar only (see generate_tab)
                progress(fraction, desc=text)
            comparison: Comparison = task.result()
        finally:
            if not task.finished:
                task.cancel()
        paths = service.save_comparison(comparison)
        by_column = []
        for value, _ in COLUMNS:
            if value == CACHED:
                by_column.append(comparison.entry(CACHED))
                continue
            precision = comparison.reference if value == SIXTEEN_BIT else Precision(value)
            if value == SIXTEEN_BIT and precision is None:  # the 16-bit run was not selected, or failed
                precision = next((e.precision for e in comparison.entries if e.precision.is_16bit and not e.cached),
                                 None)
            by_column.append(comparison.entry(precision) if precision else None)
        ran = sum(1 for e in comparison.entries if e.result is not None)
        yield (*[str(paths[e.column]) if e and e.column in paths else None for e in by_column],
               *[e.heatmap if e else None for e in by_column],
               *[compare_figures(e, comparison.reference) for e in by_column],
               comparison.request.seed, comparison_markdown(comparison), comparison.to_dict(),
               {**{column: str(path) for column, path in paths.items()},
                **({"reference": comparison.reference.value}
                   if comparison.reference and comparison.reference.value in paths else {})},
               f"{'Done' if ran == len(comparison.entries) else '⚠ Done'}: {ran} of {len(comparison.entries)} precisions in "
               f"{fmt_ms((time.perf_counter() - started) * 1000)}")

    event = button.click(None, None, status, js="() => ''", queue=False).then(  # clear the last status (see generate_tab)
        compare, [model, prompt, seed, precisions, width, height, steps, guidance, input_image, strength, *loras.inputs],
        outputs,
        api_name="compare",
        concurrency_id=GPU_CONCURRENCY_ID, show_progress_on=[*images, status])
    event.then(slide, [paths_state, against], slider, api_visibility="private", concurrency_limit=None,
               show_progress="hidden")

    def stop_job(request: gr.Request = None):
        return error_status(stop_message(service.cancel_session(session_of(request))))

    stop.click(stop_job, None, status, cancels=[event], api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
