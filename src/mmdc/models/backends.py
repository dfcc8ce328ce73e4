"""Teacher backends: one ``generate(requests, ...)`` interface, three ways to run it.

- ``hf``: in-process transformers, :class:`mmdc.models.load.Loaded` (the default);
- ``openai``: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI,
  ``mmdc serve``, hosted APIs); images go as base64 PNG data URLs;
- ``vllm``: offline ``vllm.LLM.generate`` with ``multi_modal_data`` (GPU, optional extra).

Every backend takes the same keyword arguments as :func:`mmdc.generation.generate` and
returns one stripped completion per request, in request order. Sampling with ``seed``
seeds each request on its own (``seed + i``), so a request's sample does not depend on
what else is in flight.

The ``openai`` backend keeps every completion it receives in an append-only JSONL cache
(in the run folder): a run stopped by a dead endpoint, a kill or a crash resumes without
asking the server again for what it already answered.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm.auto import tqdm

from mmdc.errors import BackendError, ConfigError, ModelError

log = logging.getLogger(__name__)


def image_data_url(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_messages(prompt: str, image_url: str | None) -> list[dict]:
    """One user turn in the OpenAI layout: the image part first, as LLaVA puts it."""
    content: list[dict] = []
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


class ResponseCache:
    """Append-only JSONL of ``{"key", "text"}``; a torn last line (a kill mid-write) is
    ignored, and so, with a warning, are damaged lines: their requests are asked again.
    Thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, str] = {}
        if self.path.is_file():
            from mmdc.data.pool import read_jsonl

            rows = read_jsonl(self.path, skip_bad=True)
            good = [r for r in rows if isinstance(r, dict) and isinstance(r.get("key"), str)
                    and isinstance(r.get("text"), str)]
            if len(good) < len(rows):
                log.warning("%s: %d answer(s) without a key and a text dropped; their "
                            "requests are asked again", self.path, len(rows) - len(good))
            for row in good:
                self._data[row["key"]] = row["text"]

    def get(self, key: str) -> str | None:
        return self._data.get(key)

    def put(self, key: str, text: str) -> None:
        from mmdc.data.pool import append_jsonl

        with self._lock:
            self._data[key] = text
            append_jsonl(self.path, {"key": key, "text": text})

    def __len__(self) -> int:
        return len(self._data)


class OpenAIBackend:
    """Generate through an OpenAI-compatible chat-completions endpoint.

    Requests run ``concurrency`` at a time. The ``openai`` client retries timeouts,
    connection errors, 429 and 5xx ``max_retries`` times with exponential backoff (and
    honours ``Retry-After``); past that the run stops with a :class:`BackendError` naming
    the endpoint, and what was answered so far stays in the cache. The API key is read from
    the environment variable ``api_key_env`` and is never logged or written anywhere."""

    name = "openai"

    def __init__(self, endpoint: str, model: str, *, api_key_env: str | None = None,
                 concurrency: int = 8, timeout: float = 120.0, max_retries: int = 5,
                 cache: str | Path | None = None):
        try:
            import openai
        except ImportError:
            raise ModelError("backend openai needs the openai package: "
                             "pip install 'mmdc[openai]'") from None
        from mmdc.config import secret_from_env

        key = secret_from_env(api_key_env, "key 'api_key_env'") if api_key_env else None
        self.endpoint = endpoint
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self._openai = openai
        self.client = openai.OpenAI(base_url=endpoint, api_key=key or "EMPTY", timeout=timeout,
                                    max_retries=max_retries)
        self.cache = ResponseCache(cache) if cache else None

    def _params(self, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                seed: int | None) -> dict:
        params: dict = {"max_tokens": max_new_tokens}
        if do_sample and temperature > 0:
            params.update(temperature=temperature, top_p=top_p)
            if seed is not None:
                params["seed"] = seed
        else:
            params["temperature"] = 0.0
        return params

    def _complete(self, messages: list[dict], params: dict) -> str:
        resp = self.client.chat.completions.create(model=self.model, messages=messages,
                                                   **params)
        return (resp.choices[0].message.content or "").strip()

    def generate(self, requests, *, max_new_tokens: int = 16, batch_size: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, desc: str | None = None,
                 progress: bool = True) -> list[str]:
        from mmdc.generation import fingerprint

        del batch_size  # the server batches; concurrency bounds what is in flight
        outputs: list[str | None] = [None] * len(requests)
        jobs = []
        urls: dict[int, str] = {}  # id(image) -> data URL: each image PNG-encoded once,
        for i, r in enumerate(requests):  # and only when the cache lacks its answer
            params = self._params(max_new_tokens, do_sample, temperature, top_p,
                                  None if seed is None else seed + i)
            key = hashlib.sha256(json.dumps([self.model, fingerprint([r]), params],
                                            sort_keys=True).encode()).hexdigest()
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                outputs[i] = hit
                continue
            url = None
            if r.image is not None:
                url = urls.get(id(r.image)) or urls.setdefault(id(r.image),
                                                               image_data_url(r.image))
            jobs.append((i, key, chat_messages(r.prompt, url), params))
        bar = tqdm(total=len(requests), initial=len(requests) - len(jobs),
                   desc=desc or "generate", disable=not progress, leave=False)

        def run(job):
            i, key, messages, params = job
            text = self._complete(messages, params)
            if self.cache is not None:
                self.cache.put(key, text)
            outputs[i] = text
            bar.update(1)

        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = [pool.submit(run, job) for job in jobs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f.exception() for f in done if f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()
                raise self._error(failed[0], sum(o is not None for o in outputs),
                                  len(requests))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return [o or "" for o in outputs]

    def _error(self, exc: BaseException, done: int, total: int) -> Exception:
        o = self._openai
        if isinstance(exc, o.APIStatusError):
            what = f"HTTP {exc.status_code}: {_short(exc.message)}"
        elif isinstance(exc, o.APITimeoutError):
            what = "request timed out"
        elif isinstance(exc, o.APIConnectionError):
            what = "cannot connect"
        else:
            return exc
        retried = (f" after {self.max_retries} retries"
                   if not isinstance(exc, o.APIStatusError) or exc.status_code in (408, 409, 429)
                   or exc.status_code >= 500 else "")
        kept = (f"; {done} of {total} responses kept in {self.cache.path}, a rerun resumes"
                if self.cache is not None else "")
        return BackendError(f"teacher endpoint {self.endpoint} (model {self.model}): "
                            f"{what}{retried}{kept}")


def _short(text: str, n: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."


class VLLMBackend:
    """Offline vLLM: ``LLM.generate`` with the image as ``multi_modal_data`` (GPU only).

    The prompt is rendered with the checkpoint's own chat template, as the ``hf`` backend
    does; vLLM adds the BOS token itself."""

    name = "vllm"

    def __init__(self, path: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                 seed: int = 0, **llm_kwargs):
        try:
            import vllm
        except ImportError:
            raise ModelError("backend vllm needs vllm (GPU): pip install 'mmdc[vllm]'") from None
        from mmdc.models.load import load_processor, resolve_model_path

        folder = resolve_model_path(path)
        self._vllm = vllm
        self.processor = load_processor(str(folder), trust_remote_code)
        self.llm = vllm.LLM(model=str(folder), dtype=dtype, seed=seed,
                            trust_remote_code=trust_remote_code, **llm_kwargs)

    def prompt(self, request) -> dict:
        from mmdc.generation import chat_text

        text = chat_text(self.processor, request.prompt, request.image is not None)
        bos = self.processor.tokenizer.bos_token
        if bos and text.startswith(bos):
            text = text[len(bos):]
        out: dict = {"prompt": text}
        if request.image is not None:
            out["multi_modal_data"] = {"image": request.image.convert("RGB")}
        return out

    def generate(self, requests, *, max_new_tokens: int = 16, batch_size: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, desc: str | None = None,
                 progress: bool = True) -> list[str]:
        if not requests:
            return []
        params = []
        for i in range(len(requests)):
            if do_sample and temperature > 0:
                params.append(self._vllm.SamplingParams(
                    max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=None if seed is None else seed + i))
            else:
                params.append(self._vllm.SamplingParams(max_tokens=max_new_tokens,
                                                        temperature=0.0))
        outs = self.llm.generate([self.prompt(r) for r in requests], params,
                                 use_tqdm=progress)
        return [o.outputs[0].text.strip() for o in outs]


def load_backend(mcfg, adapter: str | None = ..., cache_dir: str | Path | None = None):
    """What a ``ModelConfig`` names, ready to ``generate``: a :class:`Loaded` for ``hf``
    (``adapter`` overrides ``mcfg.adapter``), else an :class:`OpenAIBackend` (its response
    cache under ``cache_dir``) or a :class:`VLLMBackend`."""
    from mmdc.models.load import load_configured

    if mcfg.backend == "hf":
        return load_configured(mcfg, adapter)
    if adapter not in (..., None):
        raise ConfigError(f"backend {mcfg.backend} cannot apply the adapter {adapter}: "
                          "serve it instead (mmdc serve PATH --adapter DIR)")
    if mcfg.backend == "openai":
        name = mcfg.served_name or mcfg.path
        cache = None
        if cache_dir is not None:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
            cache = Path(cache_dir) / f"openai-{safe}.jsonl"
        return OpenAIBackend(mcfg.endpoint, name, api_key_env=mcfg.api_key_env,
                             concurrency=mcfg.concurrency, timeout=mcfg.timeout,
                             max_retries=mcfg.max_retries, cache=cache)
    if mcfg.backend == "vllm":
        return VLLMBackend(mcfg.path, dtype=mcfg.dtype,
                           trust_remote_code=mcfg.trust_remote_code)
    raise ConfigError(f"unknown backend {mcfg.backend!r} (allowed: hf, openai, vllm)")
