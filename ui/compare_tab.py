"""The Compare tab: one prompt and seed at 16-bit, FP8 and FP4 side by side, with the figures under each."""
from __future__ import annotations

import time

import gradio as gr

from pipelines.compare import CHOICES, SIXTEEN_BIT, Comparison
from pipelines.precision import Precision
from pipelines.registry import Family
from pipelines.request import GenerationRequest, RequestError

from .formatting import comparison_markdown, compare_figures, fmt_ms, precision_info
from .generate_tab import GPU_CONCURRENCY_ID, session_of, error_status, run_once, run_with_errors, size_info
from .inputs import NumberSlider, Prompt, WholeNumber, WholeSlider
from .service import PrismService

COLUMNS = ((SIXTEEN_BIT, "16-bit"), (Precision.FP8.value, "FP8"), (Precision.FP4.value, "FP4"))


def build_compare_tab(service: PrismService) -> None:
    choices = service.choices()
    first = service.default_choice(Family.FLUX)[0] or service.default_choice(Family.SDXL)[0]
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
            with gr.Row():
                button = gr.Button("Compare", variant="primary", elem_id="compare-run", scale=3)
                stop = gr.Button("Stop", variant="stop", elem_id="compare-stop", scale=1)
        with gr.Column(scale=2):
            gr.Markdown("\n\n".join(precision_info(service.support(p))
                                    for p in (service.default_precision(), Precision.FP8, Precision.FP4)),
                        elem_id="compare-precision-info")
            gr.Markdown("16-bit is the precision FP8 and FP4 compute in for the chosen model (BF16 for Flux, "
                        "FP16 for SDXL), so the differences shown are those of quantization alone. Latency is the "
                        "warm work (text encoders, denoising, VAE); first-use loading and engine builds are shown "
                        "apart.")

    status = gr.Markdown("", label="Status", elem_id="compare-status")
    images, heatmaps, figures = [], [], []
    with gr.Row(equal_height=False):
        for value, label in COLUMNS:
            key = "16bit" if value == SIXTEEN_BIT else value
            with gr.Column(elem_id=f"compare-col-{key}", min_width=200):
                # One display height for every column, so the images line up whatever their size.
                images.append(gr.Image(label=label, type="filepath", format="png", interactive=False, height=360,
                                       elem_id=f"compare-image-{key}", buttons=["download", "fullscreen"]))
                figures.append(gr.Markdown("", label=f"{label} figures", elem_id=f"compare-figures-{key}"))
                heatmaps.append(gr.Image(label=f"{label}: difference from 16-bit", type="pil", format="png",
                                         interactive=False, height=360, elem_id=f"compare-heatmap-{key}"))
    used_seed = gr.Number(None, label="Seed used", precision=0, interactive=False, visible="hidden",
                          elem_id="compare-seed-used")  # for the API; the summary shows it to people
    summary = gr.Markdown("", label="Summary", elem_id="compare-summary")
    with gr.Accordion("Figures (JSON)", open=False):
        details = gr.JSON(label="Comparison", elem_id="compare-details")

    def on_model(name: str):
        s = service.choice(name).spec
        return [gr.update(value=s.default_width, info=size_info(s)), gr.update(value=s.default_height, info=size_info(s)),
                gr.update(maximum=s.max_steps, value=s.default_steps),
                gr.update(maximum=s.max_guidance, value=s.default_guidance)]

    model.input(run_once(on_model), model, [width, height, steps, guidance], api_visibility="undocumented",
                 concurrency_limit=None, show_progress="hidden")

    outputs = [*images, *heatmaps, *figures, used_seed, summary, details, status]

    @run_with_errors(len(outputs))
    def compare(model, prompt, seed=-1, precisions=CHOICES, width=None, height=None, steps=None, guidance=None,
                request: gr.Request = None, progress=gr.Progress()):
        choice = service.choice(model)
        if not precisions:
            raise RequestError(f"Select at least one precision to compare ({', '.join(label for _, label in COLUMNS)}).")
        job_request = GenerationRequest(prompt=prompt or "", model=choice.model,
                                        seed=None if seed in (None, -1) else seed,
                                        width=width, height=height, steps=steps, guidance=guidance)
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
            precision = comparison.reference if value == SIXTEEN_BIT else Precision(value)
            if value == SIXTEEN_BIT and precision is None:  # the 16-bit run was not selected, or failed
                precision = next((e.precision for e in comparison.entries if e.precision.is_16bit), None)
            by_column.append(comparison.entry(precision) if precision else None)
        ran = sum(1 for e in comparison.entries if e.result is not None)
        yield (*[str(paths[e.precision]) if e and e.precision in paths else None for e in by_column],
               *[e.heatmap if e else None for e in by_column],
               *[compare_figures(e, comparison.reference) for e in by_column],
               comparison.request.seed, comparison_markdown(comparison), comparison.to_dict(),
               f"{'Done' if ran == len(comparison.entries) else '⚠ Done'}: {ran} of {len(comparison.entries)} precisions in "
               f"{fmt_ms((time.perf_counter() - started) * 1000)}")

    event = button.click(None, None, status, js="() => ''", queue=False).then(  # clear the last status (see generate_tab)
        compare, [model, prompt, seed, precisions, width, height, steps, guidance], outputs, api_name="compare",
        concurrency_id=GPU_CONCURRENCY_ID, show_progress_on=images)

    def stop_job(request: gr.Request = None):
        return error_status("Stopped." if service.cancel_session(session_of(request)) else "Nothing to stop.")

    stop.click(stop_job, None, status, cancels=[event], api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
