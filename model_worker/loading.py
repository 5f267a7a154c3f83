"""Model loading: task, device and dtype choices, and the one `LoadedModel` record the engine serves."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import torch

from model_worker.model_dir import ModelLoadError
from model_worker.settings import WorkerSettings

log = structlog.get_logger("model_worker.loading")

# Architecture name endings that mean "next-token generation".
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Model files up to this size go into the fingerprint by content (config, tokenizer); larger ones by size.
_FINGERPRINT_READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: Any                       # a transformers PreTrainedModel in eval mode on `device`; None at sleep level 2
    tokenizer: Any                   # a transformers tokenizer
    name: str
    path: Path
    task: str                        # "generate" | "embed"
    device: torch.device
    dtype: torch.dtype
    context_length: int              # most tokens (prompt + completion) one sequence may hold
    eos_token_ids: frozenset[int]
    hidden_size: int
    parameters: int
    load_seconds: float
    fingerprint: str                 # the answers' `system_fingerprint`: model files and settings (fingerprint())


def infer_task(config: Any) -> str:
    """`generate` for causal LM architectures, `embed` for encoders (BertModel and the like)."""
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"encoder-decoder models ({config.model_type}) are not supported")
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
            return "generate"
        return "embed"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        getattr(config, "is_decoder", False) or model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return "generate"
    return "embed"


def choose_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {spec}: CUDA is not available to this process")
        device = torch.device("cuda:0" if spec == "cuda" else spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    return torch.device("cpu")


def choose_dtype(spec: str, device: torch.device, config: Any) -> torch.dtype:
    if spec != "auto":
        return getattr(torch, spec)
    if device.type == "cpu":
        return torch.float32  # half precision on CPU is slow or unsupported
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def _context_length(config: Any, tokenizer: Any) -> int:
    lengths = [
        getattr(config, name, None)
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
    ]
    known = [n for n in lengths if isinstance(n, int) and n > 0]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:  # tokenizers without one say 1e30
        known.append(model_max)
    return min(known) if known else 2048


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def fingerprint(path: Path, task: str, device: torch.device, dtype: torch.dtype, versions: dict[str, str]) -> str:
    """OpenAI's `system_fingerprint` (a string, e.g. `fp_44709d6fcb`): what decides the answers besides
    the request, so a client sees when the backend changed. The model folder's files by name, size and,
    for the small ones (config, tokenizer), content; the task, device type and dtype; library versions.
    The same folder and settings give the same value after a restart."""
    h = hashlib.sha256()

    def part(value: str | bytes) -> None:
        raw = value.encode() if isinstance(value, str) else value
        h.update(len(raw).to_bytes(8, "big"))
        h.update(raw)

    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        size = f.stat().st_size
        part(f.relative_to(path).as_posix())
        part(str(size))
        if size <= _FINGERPRINT_READ_BYTES:
            part(f.read_bytes())
    for value in (task, device.type, str(dtype), *(f"{k}={v}" for k, v in sorted(versions.items()))):
        part(value)
    return "fp_" + h.hexdigest()[:10]


def load_model(settings: WorkerSettings, path: Path) -> LoadedModel:
    """Load tokenizer and model once, from the local folder `path`; raise ModelLoadError with the reason."""
    started = time.monotonic()
    from transformers import AutoConfig, AutoTokenizer

    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        task = settings.task or infer_task(config)
        device = choose_device(settings.device)
        dtype = choose_dtype(settings.dtype, device, config)
        log.info("device_chosen", device=str(device), requested=settings.device,
                 dtype=str(dtype).removeprefix("torch."),
                 cuda_available=torch.cuda.is_available())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = _read_weights(path, task, dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load {path}: {exc}") from exc
    if device.type == "cuda" and settings.cuda_memory_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(settings.cuda_memory_fraction, device)
    model.to(device)
    model.eval()
    context_length = _context_length(config, tokenizer)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=settings.model_name,
        path=path,
        task=task,
        device=device,
        dtype=dtype,
        context_length=context_length,
        eos_token_ids=_eos_ids(model, tokenizer),
        hidden_size=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0),
        parameters=sum(p.numel() for p in model.parameters()),
        load_seconds=time.monotonic() - started,
        fingerprint=fingerprint(path, task, device, dtype, _versions()),
    )


def _read_weights(path: Path, task: str, dtype: torch.dtype) -> Any:
    """The model object from `path`'s files, on the CPU (the caller moves it)."""
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if task == "generate" else AutoModel
    return auto.from_pretrained(path, local_files_only=True, dtype=dtype)


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def reload_model(loaded: LoadedModel) -> LoadedModel:
    """Wake from sleep level 2: read the weights again from the same folder, with the task, dtype and
    device chosen at start; the fingerprint is taken anew, so a folder changed meanwhile shows."""
    try:
        model = _read_weights(loaded.path, loaded.task, loaded.dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot reload {loaded.path}: {exc}") from exc
    model.to(loaded.device)
    model.eval()
    return replace(loaded, model=model,
                   fingerprint=fingerprint(loaded.path, loaded.task, loaded.device, loaded.dtype, _versions()))
