"""``mmdc serve``: an OpenAI-compatible chat-completions server for any checkpoint mmdc loads.

Users serve their distilled student (or a teacher, for the ``openai`` backend) with it:

    mmdc serve runs/default/student --port 8000
    curl http://127.0.0.1:8000/v1/models

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (images as base64 ``data:`` URLs,
no streaming). Binds 127.0.0.1 unless told otherwise; with ``--token-env VAR`` every request
must carry ``Authorization: Bearer $VAR``. Oversized bodies get 413, too many images,
malformed messages or unreadable images 400, each with an OpenAI-style JSON error.

Concurrent greedy requests with the same settings are batched (up to ``max_batch``) through
the same left-padded batched generation as the ``hf`` backend; a sampled request with a
``seed`` runs alone, seeded, so its sample does not depend on what else is in flight.
"""


import base64
import binascii
import hmac
import io
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

from mmdc.data.images import MAX_IMAGE_PIXELS, open_checked
from mmdc.errors import MmdcError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class RequestError(MmdcError):
    """A bad request: becomes an HTTP 4xx with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def decode_image(url: str, n: int, max_pixels: int | None = MAX_IMAGE_PIXELS):
    from PIL import UnidentifiedImageError

    from mmdc.errors import DataError

    if not url.startswith("data:") or "," not in url:
        raise RequestError(400, f"image {n}: only base64 data: URLs are accepted "
                                "(data:image/png;base64,...)")
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise RequestError(400, f"image {n}: the data URL is not base64-encoded")
    try:
        raw = base64.b64decode(payload, validate=True)
        img = open_checked(io.BytesIO(raw), f"image {n}", max_pixels)
        img.load()
    except (binascii.Error, ValueError):
        raise RequestError(400, f"image {n}: invalid base64") from None
    except DataError as exc:  # over the pixel limit, refused by its header
        raise RequestError(400, str(exc).replace("data.max_image_pixels",
                                                 "--max-image-pixels")) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise RequestError(400, f"image {n}: not a readable image ({exc})") from None
    return img.convert("RGB")


def to_template_messages(messages, max_images: int,
                         max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[list[dict], list]:
    """OpenAI chat messages -> the processor's chat-template messages and the images."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: a non-empty list is required")
    out, images = [], []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{k}]: role must be system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str):
                        raise RequestError(400, f"messages[{k}].content[{j}]: image_url.url "
                                                "is required")
                    images.append(url)
                    if len(images) > max_images:
                        raise RequestError(400, f"too many images: at most {max_images} per "
                                                "request")
                    parts.append({"type": "image"})
                else:
                    raise RequestError(400, f"messages[{k}].content[{j}]: unsupported part "
                                            f"type {kind!r} (text, image_url)")
        else:
            raise RequestError(400, f"messages[{k}].content: a string or a list of parts "
                                    "is required")
        out.append({"role": m["role"], "content": parts})
    return out, [decode_image(u, n + 1, max_pixels) for n, u in enumerate(images)]


@dataclass
class _Job:
    text: str
    image: object
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    future: Future = field(default_factory=Future)

    @property
    def batch_key(self):
        if self.temperature > 0 and self.seed is not None:
            return None  # seeded samples run alone
        return (self.max_new_tokens, self.temperature, self.top_p, self.image is None)


class Batcher:
    """One worker thread owns the model and its tokenizer; it takes what is queued and
    generates it in batches of requests that share their settings."""

    def __init__(self, loaded, max_batch: int = 16):
        self.loaded = loaded
        self.max_batch = max_batch
        self.queue: queue.Queue[_Job] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="mmdc-serve")
        self.thread.start()

    def submit(self, job: _Job) -> Future:
        self.queue.put(job)
        return job.future

    def _loop(self) -> None:
        pending: list[_Job] = []
        while True:
            if not pending:
                pending.append(self.queue.get())
            time.sleep(0.002)  # let concurrent requests arrive
            while True:
                try:
                    pending.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            first = pending[0]
            key = first.batch_key
            batch = [first] if key is None else [
                j for j in pending if j.batch_key == key][: self.max_batch]
            pending = [j for j in pending if j not in batch]
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        from mmdc.generation import Request, generate

        j = batch[0]
        try:
            texts = generate(self.loaded.model, self.loaded.processor,
                             [Request("", b.image, text=b.text) for b in batch],
                             max_new_tokens=j.max_new_tokens, batch_size=len(batch),
                             do_sample=j.temperature > 0, temperature=j.temperature,
                             top_p=j.top_p, seed=j.seed, progress=False)
        except Exception as exc:  # noqa: BLE001 - each caller gets the error as a 500
            for b in batch:
                b.future.set_exception(exc)
            return
        # the tokenizer is not thread-safe (padding state): count tokens here, on the worker
        tok = self.loaded.processor.tokenizer
        for b, t in zip(batch, texts):
            b.future.set_result((t, len(tok(b.text, add_special_tokens=False)["input_ids"]),
                                 len(tok(t, add_special_tokens=False)["input_ids"])))


def create_app(loaded, *, name: str, token: str | None = None,
               max_bytes: int = DEFAULT_MAX_BYTES, max_images: int = 1,
               max_new_tokens: int = 1024, max_batch: int = 16,
               max_pixels: int | None = MAX_IMAGE_PIXELS):
    """The FastAPI application serving ``loaded`` (a :class:`~mmdc.models.load.Loaded`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        messages: list
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        seed: int | None = None
        n: int = 1
        stream: bool = False

    app = FastAPI(title="mmdc serve", version="1")
    batcher = Batcher(loaded, max_batch=max_batch)
    app.state.batcher = batcher

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse(status_code=status,
                            content={"error": {"message": message, "type": kind,
                                               "code": status}})

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "invalid or missing bearer token", "authentication_error")
        length = request.headers.get("content-length", "")
        size = int(length) if length.isdigit() else 0
        if size > max_bytes:
            if size <= 8 * max_bytes:
                # read (and drop) the rest of a moderately oversized body first: a reply
                # sent while the client is still writing can reach it as a broken pipe
                # instead of the 413; far larger bodies are cut off unread
                async for _ in request.stream():
                    pass
            return error(413, f"request body of {size} bytes is over the limit of "
                              f"{max_bytes} bytes")
        return await call_next(request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "mmdc"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        import asyncio
        import json

        body = await request.body()
        if len(body) > max_bytes:
            return error(413, f"request body of {len(body)} bytes is over the limit of "
                              f"{max_bytes} bytes")
        try:
            req = ChatRequest.model_validate(json.loads(body))
        except json.JSONDecodeError as exc:
            return error(400, f"the body is not JSON ({exc.msg})")
        except ValidationError as exc:
            e = exc.errors()[0]
            return error(400, f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}")
        if req.stream:
            return error(400, "stream: streaming is not supported; send stream=false")
        if req.n != 1:
            return error(400, "n: only n=1 is supported")
        if req.model not in (None, name):
            return error(404, f"model {req.model!r} not found (this server has {name!r})",
                         "not_found_error")
        want = req.max_completion_tokens or req.max_tokens or 256
        if want > max_new_tokens:
            return error(400, f"max_tokens: {want} is over this server's limit of "
                              f"{max_new_tokens}")
        try:
            messages, images = to_template_messages(req.messages, max_images, max_pixels)
            text = loaded.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                        tokenize=False)
        except RequestError as exc:
            return error(exc.status, str(exc), exc.kind)
        job = _Job(text, images[0] if images else None, want, req.temperature, req.top_p,
                   req.seed)
        try:
            out, prompt_tokens, completion_tokens = await asyncio.wrap_future(
                batcher.submit(job))
        except Exception as exc:  # noqa: BLE001
            log.exception("generation failed")
            return error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                         "finish_reason": "length" if completion_tokens >= want else "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    return app


def serve(path: str, *, adapter: str | None = None, name: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          max_bytes: int = DEFAULT_MAX_BYTES, max_images: int = 1, max_batch: int = 16,
          max_new_tokens: int = 1024, dtype: str = "float32", device: str = "auto",
          max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    try:
        import uvicorn
    except ImportError:
        raise MmdcError("mmdc serve needs fastapi and uvicorn: pip install 'mmdc[serve]'") from None
    from mmdc.models.load import load_model

    loaded = load_model(path, adapter=adapter, dtype=dtype, device=device)
    name = name or path
    app = create_app(loaded, name=name, token=token, max_bytes=max_bytes,
                     max_images=max_images, max_batch=max_batch, max_new_tokens=max_new_tokens,
                     max_pixels=max_pixels)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who can reach it can use it", host)
    import sys

    print(f"mmdc serve: {name} at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
