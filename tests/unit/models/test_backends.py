"""Backend plumbing that needs no server or GPU: the vllm backend's requests (against a
stand-in ``vllm`` module: vllm itself needs a GPU), the response cache, load_backend."""

import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from mmdc.config import load_config
from mmdc.errors import ModelError
from mmdc.generation import Request
from mmdc.models.backends import ResponseCache, VLLMBackend, load_backend


class FakeVLLM:
    """Records what mmdc hands to vllm.LLM / SamplingParams (unit test stand-in)."""

    def __init__(self):
        self.llm_kwargs = None
        self.calls = []
        fake = self

        class LLM:
            def __init__(self, **kw):
                fake.llm_kwargs = kw

            def generate(self, prompts, params, use_tqdm=True):
                fake.calls.append((prompts, params))
                return [SimpleNamespace(outputs=[SimpleNamespace(text=f" out {i} ")])
                        for i in range(len(prompts))]

        self.LLM = LLM
        self.SamplingParams = lambda **kw: kw


def test_vllm_backend_sends_templated_prompts_images_and_per_request_seeds(monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = VLLMBackend("builtin:teacher", dtype="bfloat16")
    assert fake.llm_kwargs["dtype"] == "bfloat16" and fake.llm_kwargs["model"].endswith("teacher")
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    reqs = [Request("What color?", img), Request("Which word?")]
    assert backend.generate(reqs, max_new_tokens=7) == ["out 0", "out 1"]
    prompts, params = fake.calls[-1]
    assert not prompts[0]["prompt"].startswith("<s>")  # vllm adds BOS itself
    assert prompts[0]["prompt"].startswith("USER: <image>\nWhat color?")
    assert prompts[0]["multi_modal_data"]["image"].size == (32, 32)
    assert "multi_modal_data" not in prompts[1]
    assert params[0] == {"max_tokens": 7, "temperature": 0.0}
    backend.generate(reqs, max_new_tokens=5, do_sample=True, temperature=0.7, seed=10)
    _, params = fake.calls[-1]
    assert [p["seed"] for p in params] == [10, 11] and params[0]["temperature"] == 0.7


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ModelError, match=r"mmdc\[vllm\]"):
        VLLMBackend("builtin:teacher")


def test_response_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ResponseCache(path)
    cache.put("a", "first")
    cache.put("b", "second")
    with open(path, "a") as f:
        f.write('{"key": "c", "te')  # killed mid-write
    again = ResponseCache(path)
    assert len(again) == 2 and again.get("b") == "second" and again.get("c") is None


def test_load_backend_builds_what_the_config_names(monkeypatch, tmp_path):
    cfg = load_config(None, ["teacher.backend=openai", "teacher.endpoint=http://127.0.0.1:9/v1",
                             "teacher.served_name=big-teacher", "teacher.api_key_env=MMDC_K",
                             "improve.enabled=false"])
    monkeypatch.delenv("MMDC_K", raising=False)
    with pytest.raises(Exception, match="MMDC_K is not set"):
        load_backend(cfg.teacher)
    monkeypatch.setenv("MMDC_K", "k")
    b = load_backend(cfg.teacher, cache_dir=tmp_path)
    assert b.name == "openai" and b.model == "big-teacher"
    assert str(b.cache.path).endswith("openai-big-teacher.jsonl")
    assert load_backend(load_config(None, []).teacher).name == "hf"
