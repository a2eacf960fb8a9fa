"""OpenAI's images API over PrismService: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`.

Fields become one GenerationRequest that the service checks and the manager queues, exactly as a UI request
(no model logic and no second queue here); results come back as the same PNGs the UI saves, with their
A1111 and Prism metadata chunks, base64-encoded. OpenAI's names map to ours:

    prompt, model, n, size "WxH" | "auto", quality (low/medium/high... scales the model's default steps),
    response_format "b64_json" (the default; "url" is refused), and Prism's own: negative_prompt,
    num_inference_steps, guidance_scale, seed, precision.
"""
from __future__ import annotations

import base64
import io
import logging
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Mapping

import anyio
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipelines.errors import user_message
from pipelines.image_input import InputImage, read_image, upright
from pipelines.loading import ModelAccessError
from pipelines.manager import Job, QueueFullError
from pipelines.request import GenerationRequest, GenerationResult, RequestError
from pipelines.residency import InsufficientMemoryError

from .api_errors import ApiError
from .service import ModelChoice, PrismService

log = logging.getLogger("prism.api")

# quality -> factor on the model's default steps. OpenAI's names; "standard"/"hd" are DALL-E 3's.
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 1.5, "hd": 1.5, "xhigh": 2.0,
                 "max": 2.0}
GENERATION_FIELDS = ("prompt", "model", "n", "size", "quality", "response_format", "negative_prompt",
                     "num_inference_steps", "guidance_scale", "seed", "precision")
# OpenAI fields that change nothing here (abuse tracking, moderation level), accepted so clients need no changes.
IGNORED_FIELDS = ("user", "safety_identifier", "moderation")
# OpenAI fields accepted only at the one value Prism produces.
FIXED_FIELDS = {"output_format": ("png",), "background": ("auto", "opaque"), "stream": (False, "false"),
                "partial_images": (0, "0"), "output_compression": (100, "100")}
NOT_YET = {"lora": "The lora field is not an OpenAI one; write <lora:NAME:SCALE> in the prompt instead.",
           "style": "style is a DALL-E 3 option Prism does not have; describe the style in the prompt instead."}
SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
RETRY_AFTER_S = 5  # about one full-size image on a fast GPU; a demo image takes well under a second
WAIT_POLL_S = 0.25  # how often a waiting request looks for its client having gone away
MAX_UPLOAD_BYTES = 50 * 2**20  # OpenAI's own limit for an edit's image
# Prism's own edit fields: how much of the picture is repainted, and the mask's blur where the result is pasted back.
EDIT_FIELDS = ("strength", "mask_blur")


@dataclass(frozen=True)
class EditInputs:
    """A checked `/v1/images/edits` request: the picture (and mask) and the image-to-image request."""

    images: tuple[InputImage, ...]  # OpenAI's clients may send several; the first is edited
    mask: InputImage | None  # white = repaint (an OpenAI mask's transparent pixels become white)
    request: GenerationRequest  # the prompt and every setting, checked as a generation request


class OpenAIImages:
    def __init__(self, service: PrismService, count: Callable[[str, int], None] = lambda endpoint, status: None):
        self.service = service
        self.count = count  # (endpoint, HTTP status) for each answered request: the metrics
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [Route("/v1/images/generations", self._endpoint("generations", self.generations), methods=["POST"]),
                Route("/v1/images/edits", self._endpoint("edits", self.edits), methods=["POST"]),
                Route("/v1/models", self._endpoint("models", self.models), methods=["GET"]),
                Route("/v1/models/{name:path}", self._endpoint("models", self.model), methods=["GET"]),
                Route("/v1/{rest:path}", self._endpoint("other", self.unknown),
                      methods=["GET", "POST", "PUT", "PATCH", "DELETE"])]

    def _endpoint(self, name: str, handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Errors in OpenAI's shape, counted; an unexpected one is logged and answered without internals."""

        async def endpoint(request: Request) -> Response:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = error_response(exc)
            except Exception as exc:
                log.exception("API request failed")
                response = error_response(ApiError(500, user_message(exc), code="internal_error"))
            self.count(name, response.status_code)
            return response

        return endpoint

    # ------------------------------------------------------------------ endpoints

    async def generations(self, request: Request) -> Response:
        fields = await _json_object(request)
        req = self.request_from_fields(fields)
        result = await self.run(request, req)
        return JSONResponse(self.images_response(result))

    async def edits(self, request: Request) -> Response:
        inputs = await self.edit_inputs(request)
        return await self.run_edit(request, inputs)

    async def run_edit(self, request: Request, inputs: EditInputs) -> Response:
        """Image to image on the first picture (inpainting where a mask is given), as the UI runs it."""
        req = replace(inputs.request, image=inputs.images[0], mask=inputs.mask)
        return JSONResponse(self.images_response(await self.run(request, req)))

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_entry(c) for c in self.service.models]})

    async def model(self, request: Request) -> Response:
        return JSONResponse(self.model_entry(self.choice(request.path_params["name"])))

    async def unknown(self, request: Request) -> Response:
        raise ApiError(404, f"No endpoint {request.method} {request.url.path}. Prism serves POST /v1/images/generations, "
                            "POST /v1/images/edits and GET /v1/models.", code="unknown_url")

    # ------------------------------------------------------------------ fields -> GenerationRequest

    def choice(self, name: Any) -> ModelChoice:
        if name is None or name == "":
            choice = self.service.default_model()
            if choice is None:
                raise ApiError(404, "This server offers no model; start it with --models.", param="model",
                               code="model_not_found")
            return choice
        if not isinstance(name, str):
            raise ApiError(400, "model must be a model name (GET /v1/models lists them).", param="model")
        try:
            return self.service.choice(name)  # offered names only: a request never names a server folder
        except RequestError as exc:
            raise ApiError(404, str(exc), param="model", code="model_not_found") from None

    def request_from_fields(self, fields: Mapping[str, Any], extra: tuple[str, ...] = (),
                            image: Any = None) -> GenerationRequest:
        """One checked GenerationRequest from OpenAI-style fields (JSON values, or strings from a form), with the
        edit's input image when there is one (a model that edits images, such as Kontext, needs it to check)."""
        given = {k: v for k, v in fields.items() if v is not None}
        for name, why in NOT_YET.items():
            if name in given:
                raise ApiError(400, why, param=name, code="unsupported_parameter")
        known = GENERATION_FIELDS + IGNORED_FIELDS + tuple(FIXED_FIELDS) + extra
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}. Prism's images API takes: "
                                f"{', '.join(GENERATION_FIELDS)}.", param=unknown[0], code="unknown_parameter")
        for name, values in FIXED_FIELDS.items():
            if name in given and given[name] not in values:
                raise ApiError(400, f"{name} {given[name]!r} is not available: Prism answers with "
                                    f"{name}={values[0]!r} only.", param=name, code="unsupported_value")
        response_format = given.get("response_format", "b64_json")
        if response_format == "url":
            raise ApiError(400, "response_format 'url' is not available: Prism does not host generated files. "
                                "Ask for response_format 'b64_json' (the default here).", param="response_format",
                           code="unsupported_value")
        if response_format != "b64_json":
            raise ApiError(400, f"response_format must be 'b64_json'; got {response_format!r}.",
                           param="response_format")
        prompt = given.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            what = ("describing the image" if image is None else
                    "saying what the picture should become (for an editing model, the instruction: \"make the sky red\")")
            raise ApiError(400, f"prompt is required: a non-empty text {what}.", param="prompt")
        negative = given.get("negative_prompt", "")
        if not isinstance(negative, str):
            raise ApiError(400, "negative_prompt must be text.", param="negative_prompt")
        choice = self.choice(given.get("model"))
        width, height = _size(given.get("size", "auto"))
        steps = given.get("num_inference_steps")
        if steps is None and "quality" in given:
            steps = _quality_steps(given["quality"], choice)
        req = GenerationRequest(
            prompt=prompt, model=choice.model, precision=given.get("precision") or self.service.default_precision().value,
            negative_prompt=negative, width=width, height=height, steps=steps, guidance=given.get("guidance_scale"),
            seed=given.get("seed"), num_images=given.get("n", 1), image=image)
        try:
            self.service.check(req)  # every field the way the UI's are checked, before anything is queued
        except RequestError as exc:
            raise ApiError(400, str(exc), code="invalid_value") from None
        return req

    async def edit_inputs(self, request: Request) -> EditInputs:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "Image edits are sent as multipart/form-data, with the image as a file field.",
                           param="image")
        try:
            form = await request.form(max_part_size=4 * 2**20)
        except HTTPException as exc:  # Starlette's answer to a malformed multipart body
            raise ApiError(400, f"The multipart body could not be read: {exc.detail}", param="image") from None
        try:
            uploads = [v for key in ("image", "image[]") for v in form.getlist(key)]
            if not uploads:
                raise ApiError(400, "image is required: the picture to edit, as a file field.", param="image")
            images = tuple([await _read_image(upload, "image") for upload in uploads])
            mask = await _read_image(form["mask"], "mask") if "mask" in form else None
            fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask")}
        finally:
            await form.close()
        if mask is not None and mask.size != images[0].size:
            raise ApiError(400, f"mask is {mask.size[0]}x{mask.size[1]} but the image is "
                                f"{images[0].size[0]}x{images[0].size[1]}; they must be the same size.", param="mask")
        req = self.request_from_fields(fields, extra=("input_fidelity",) + EDIT_FIELDS, image=images[0])
        # Our own fields (form values are text; resolve_request checks and converts them).
        req = replace(req, **{k: fields[k] for k in EDIT_FIELDS if fields.get(k) not in (None, "")})
        return EditInputs(images, mask, req)

    # ------------------------------------------------------------------ running

    async def run(self, request: Request, req: GenerationRequest) -> GenerationResult:
        """Queue `req` on the manager and wait for it; a client that goes away cancels its job."""
        try:
            job = self.service.manager.submit(req)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        while True:
            try:
                return await anyio.to_thread.run_sync(_result, job)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise ApiError(499, "The client closed the connection; the job was cancelled.",
                                   code="client_closed") from None
            except RequestError as exc:
                raise ApiError(400, str(exc), code="invalid_value") from None
            except ModelAccessError as exc:
                raise ApiError(503, str(exc), param="model", code="model_unavailable") from None
            except InsufficientMemoryError as exc:
                raise ApiError(503, str(exc), code="insufficient_memory") from None
            except Exception as exc:  # numerics, an internal error: the worker logged it and carries on
                raise ApiError(500, user_message(exc), code="generation_failed") from None

    def images_response(self, result: GenerationResult) -> dict[str, Any]:
        pngs = self.service.result_pngs(result)
        req = result.request
        return {"created": int(time.time()), "output_format": "png", "size": f"{req.width}x{req.height}",
                "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed}
                         for png, seed in zip(pngs, result.seeds)],
                "prism": {**result.settings(), "timings_ms": {"total": round(result.timings.total_ms, 1),
                                                              "load": round(result.timings.load_ms, 1)},
                          # What the UI shows under a result with a ⚠ (a fallback, a turned input, unknown words).
                          "warnings": list(result.warnings)}}

    def model_entry(self, choice: ModelChoice) -> dict[str, Any]:
        spec = choice.spec
        return {"id": choice.name, "object": "model", "created": self.created, "owned_by": "prism",
                "family": spec.family.value, "default_size": f"{spec.default_width}x{spec.default_height}",
                "default_steps": spec.default_steps, "max_images": spec.max_images,
                "sizes": {"multiple_of": spec.size.multiple_of, "min_side": spec.size.min_side,
                          "max_side": spec.size.max_side}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _result(job: Job) -> GenerationResult:
    """The job's result, or TimeoutError while it is still queued or running."""
    try:
        return job.result(timeout=WAIT_POLL_S)
    except TimeoutError:
        if job.done:  # the job itself failed with a TimeoutError: not ours to swallow
            raise RuntimeError("The job timed out.") from None
        raise


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "The request body must be a JSON object, e.g. {\"prompt\": \"a red fox\", "
                            "\"size\": \"1024x1024\"}.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object of fields, not a list or a value.")
    return body


def _size(value: Any) -> tuple[int | None, int | None]:
    if value in ("auto", ""):
        return None, None  # the model's default size
    match = SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise ApiError(400, f"size must be 'WIDTHxHEIGHT' such as '1024x1024' (or 'auto'); got {value!r}.",
                       param="size")
    return int(match.group(1)), int(match.group(2))


def _quality_steps(quality: Any, choice: ModelChoice) -> int:
    if quality not in QUALITY_STEPS:
        raise ApiError(400, f"quality must be one of {', '.join(QUALITY_STEPS)}; got {quality!r}.", param="quality")
    spec = choice.spec
    return max(1, min(spec.max_steps, round(spec.default_steps * QUALITY_STEPS[quality])))


async def _read_image(upload: Any, field: str) -> InputImage:
    """An uploaded picture, checked and converted by the same rules as the UI's and CLI's (image_input.read_image:
    size caps before decoding, RGB, first frame). OpenAI's masks mark the area to edit as transparent: those become
    Prism's white (repaint) and the rest black."""
    if isinstance(upload, str) or not hasattr(upload, "read"):
        raise ApiError(400, f"{field} must be sent as a file, not a text field.", param=field)
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(400, f"{field} is larger than {MAX_UPLOAD_BYTES // 2**20} MB.", param=field)
    try:
        source: bytes | Image.Image = data
        if field == "mask":
            source = _openai_mask(data)
        return read_image(source, field)
    except RequestError as exc:
        raise ApiError(400, str(exc), param=field) from None


def _openai_mask(data: bytes) -> bytes | Image.Image:
    """A mask with an alpha channel, as OpenAI's API takes it (transparent = edit here), as a white-on-black mask."""
    try:
        image = Image.open(io.BytesIO(data))
        if "A" not in image.getbands():
            return data  # already white-on-black: read_image checks it like any upload
        read_image(data, "mask")  # the same size and format checks before the pixels are touched
        alpha = upright(image)[0].convert("RGBA").getchannel("A")  # turned as the picture is
    except RequestError:
        raise
    except Exception:
        return data  # read_image says what is wrong with it
    return alpha.point(lambda a: 255 if a == 0 else 0).convert("RGB")
