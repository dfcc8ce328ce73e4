"""Loading teacher and student checkpoints: the path a llava-hf checkpoint takes.

``load_model`` reads any local ``save_pretrained`` folder with
``AutoModelForImageTextToText`` and ``AutoProcessor`` (and applies a PEFT adapter if
given). ``builtin:teacher`` / ``builtin:student`` only name the folders of the toy
checkpoints that ship with the package; they are loaded exactly like any other folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mmdc.errors import ModelError

log = logging.getLogger(__name__)

TOY_DIR = Path(__file__).resolve().parent.parent / "toy" / "checkpoints"
BUILTIN_PREFIX = "builtin:"
BUILTIN_NAMES = ("teacher", "student")


def resolve_model_path(path: str) -> Path:
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_NAMES:
            raise ModelError(f"unknown built-in model {path!r} (allowed: "
                             f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_NAMES)})")
        folder = TOY_DIR / name
        if not (folder / "config.json").is_file():
            raise ModelError(f"the built-in {name} checkpoint is missing at {folder}; "
                             f"build it with: mmdc models build-toy")
        return folder
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"{folder}: model folder not found (model hubs are not used; "
                         f"pass a local save_pretrained folder)")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: not a save_pretrained model folder (no config.json)")
    return folder


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "auto": "auto"}[name]


@dataclass
class Loaded:
    model: object
    processor: object
    path: Path
    cache: str = "dynamic"  # the KV cache generate uses (mmdc.generation.generate)

    name = "hf"

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def generate(self, requests, **kwargs) -> list[str]:
        """The ``hf`` backend: batched in-process generation (see
        :func:`mmdc.generation.generate` for the keyword arguments)."""
        from mmdc.generation import generate

        kwargs.setdefault("cache", self.cache)
        return generate(self.model, self.processor, requests, **kwargs)


def load_processor(path: str, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    folder = resolve_model_path(path)
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{folder}: cannot load the processor "
                         f"({str(exc).splitlines()[0]})") from None
    if not hasattr(processor, "tokenizer"):
        raise ModelError(f"{folder}: the processor has no tokenizer: not an image-text model")
    return processor


def load_model(path: str, *, adapter: str | None = None, dtype: str = "float32",
               device: str = "auto", trust_remote_code: bool = False) -> Loaded:
    """Load an image-text-to-text model and its processor from a local folder."""
    from transformers import AutoModelForImageTextToText

    folder = resolve_model_path(path)
    if trust_remote_code:
        log.warning("trust_remote_code is on for %s: code from that folder will run", folder)
    processor = load_processor(path, trust_remote_code)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=_dtype(dtype), trust_remote_code=trust_remote_code,
            local_files_only=True, use_safetensors=True,
        )
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file (SafetensorError,
        # OSError, ValueError, ...): reported with the folder, not as a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{folder}: cannot load the model ({first})") from None
    if adapter:
        model = load_adapter(model, adapter)
    model.to(_device(device))
    model.eval()
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return Loaded(model, processor, folder)


def load_adapter(model, adapter: str | Path, is_trainable: bool = False):
    """Apply a PEFT adapter folder; a missing, corrupt or truncated one is a ModelError
    naming the folder."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file, reported
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{adapter_dir}: unreadable adapter ({first}); restore it, or "
                         "rerun in a new run_dir") from None


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def vocab_report(teacher_path: str, student_path: str) -> dict:
    """Whether teacher and student share a tokenizer (needed for token-level KD)."""
    t = load_processor(teacher_path).tokenizer
    s = load_processor(student_path).tokenizer
    same_vocab = t.get_vocab() == s.get_vocab()
    return {
        "teacher_vocab_size": len(t), "student_vocab_size": len(s),
        "shared_vocabulary": same_vocab,
        "same_special_tokens": (t.eos_token_id, t.pad_token_id) == (s.eos_token_id, s.pad_token_id),
    }


def load_configured(mcfg, adapter: str | None = ...) -> Loaded:
    """Load the model a ``ModelConfig`` names; ``adapter`` overrides ``mcfg.adapter``."""
    loaded = load_model(mcfg.path, adapter=mcfg.adapter if adapter is ... else adapter,
                        dtype=mcfg.dtype, device=mcfg.device,
                        trust_remote_code=mcfg.trust_remote_code)
    loaded.cache = mcfg.cache
    return loaded
