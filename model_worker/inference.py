"""Inference: what runs on the one inference thread (prompt building, token loop, embeddings, OOM).

Nothing here touches the event loop. A generation reports to it only through the `emit` callback it
is given (the app wires that to `loop.call_soon_threadsafe`), and learns that its client left only
through its `cancel` event, checked once per token.
"""

from __future__ import annotations

import base64
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from model_worker.loading import LoadedModel

log = structlog.get_logger("model_worker.inference")

INJECTED_OOM_MESSAGE = "CUDA out of memory. (injected)"

# A minimal ChatML-like template for tokenizers that carry none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class InvalidRequest(ValueError):
    """The request cannot be served as asked (prompt too long, bad template input): a 400."""

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class WorkerOutOfMemory(RuntimeError):
    """The device ran out of memory; the cache has already been freed: a 503 with X-Worker-Error: oom."""


# ---- requests (built by openai_api from validated JSON) ---------------------------------------

@dataclass(frozen=True, slots=True)
class GenerationSpec:
    prompt: str | tuple[int, ...] | None      # /v1/completions
    messages: tuple[dict[str, str], ...] | None  # /v1/chat/completions
    max_tokens: int | None                    # None: a default (16 for completions, the rest of the context for chat)
    min_tokens: int
    ignore_eos: bool                          # vLLM's extension: never stop on end-of-sequence
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


@dataclass(frozen=True, slots=True)
class EmbeddingSpec:
    inputs: tuple[str | tuple[int, ...], ...]
    encoding_format: str                      # "float" | "base64"


# ---- events a generation sends to the event loop --------------------------------------------

@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str                        # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    @property
    def cancelled(self) -> bool:
        return self.finish_reason == "cancelled"


@dataclass(frozen=True, slots=True)
class Failed:
    error: BaseException


Event = TextDelta | Finished | Failed


@dataclass(slots=True)
class GenerationJob:
    spec: GenerationSpec
    default_max_tokens: int
    emit: Callable[[Event], None]
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    data: list[list[float] | str]
    prompt_tokens: int


# ---- helpers ---------------------------------------------------------------------------------

def free_device_memory() -> None:
    """Drop unreachable objects and give cached CUDA blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class FaultInjector:
    """Test seam (MODEL_WORKER_FAULT): raise a CUDA OOM inside the inference thread, always or once.

    Used from the inference thread only, so the `fired` flag needs no lock.
    """

    def __init__(self, mode: str | None) -> None:
        self.mode = mode
        self.fired = False

    def check(self) -> None:
        if self.mode == "oom" or (self.mode == "oom_once" and not self.fired):
            self.fired = True
            raise torch.cuda.OutOfMemoryError(INJECTED_OOM_MESSAGE)


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return hold


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    """Index of the earliest stop string found at or after `start`, or -1."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


def _select_token(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> int:
    """Greedy when temperature == 0, else temperature + nucleus (top_p) sampling."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    # Shift first and divide in float64: the top logit becomes exactly 0 and a tiny temperature (1e-300 is
    # 0 in float32) sends the rest to -inf, never to inf - inf or 0 / 0 = nan.
    logits = (logits.double() - logits.max()) / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs > top_p   # keeps at least the top token
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Detokenizer:
    """Incremental decoding that never emits half a UTF-8 character (prefix/read offsets, as vLLM)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def flush(self) -> None:
        """At the end: whatever is left, replacement characters included."""
        rest = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        self.text += rest[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)


# ---- the engine ------------------------------------------------------------------------------

class Engine:
    """Owns the loaded model; every method here runs on the single inference thread."""

    def __init__(self, loaded: LoadedModel, fault: str | None = None) -> None:
        self.loaded = loaded
        self.faults = FaultInjector(fault)

    # -- generation --

    def run_generation(self, job: GenerationJob) -> Finished | None:
        """Thread entry point: run `job`, send its events, and always end with Finished or Failed.

        Returns the Finished record (None on failure) for the caller's bookkeeping.
        """
        try:
            with torch.inference_mode():
                finished = self._guard_oom(self._generate, job)
        except Exception as exc:  # the thread's top level: the handler maps it (400, 503, or 500 + log)
            job.emit(Failed(exc))
            return None
        job.emit(finished)
        return finished

    def prompt_ids(self, spec: GenerationSpec) -> list[int]:
        tok = self.loaded.tokenizer
        if spec.messages is not None:
            from jinja2 import TemplateError

            template = None if getattr(tok, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
            try:
                text = tok.apply_chat_template(
                    list(spec.messages), chat_template=template, tokenize=False, add_generation_prompt=True
                )
            except TemplateError as exc:
                raise InvalidRequest(f"the chat template rejected these messages: {exc}", "messages") from exc
            ids = tok.encode(text, add_special_tokens=False)
        elif isinstance(spec.prompt, tuple):
            ids = list(spec.prompt)
            vocab = len(tok)
            if any(i < 0 or i >= vocab for i in ids):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        else:
            ids = tok.encode(spec.prompt or "")
        if not ids:  # an empty prompt starts from the beginning-of-text token, as OpenAI's does
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise InvalidRequest("the prompt is empty", "prompt")
            ids = [start]
        return ids

    def _max_tokens(self, spec: GenerationSpec, prompt_tokens: int, default: int) -> int:
        context = self.loaded.context_length
        param = "messages" if spec.messages is not None else "prompt"
        if prompt_tokens >= context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, your {param} has "
                f"{prompt_tokens} tokens, leaving no room for a completion.",
                param, "context_length_exceeded",
            )
        if spec.max_tokens is None:
            return max(1, min(default, context - prompt_tokens))
        if prompt_tokens + spec.max_tokens > context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + spec.max_tokens} tokens ({prompt_tokens} in the {param}, "
                f"{spec.max_tokens} for the completion). Please reduce the length of the {param} or max_tokens.",
                "max_tokens", "context_length_exceeded",
            )
        return spec.max_tokens

    def _generate(self, job: GenerationJob) -> Finished:
        started = time.monotonic()
        spec = job.spec
        ids = self.prompt_ids(spec)
        max_tokens = self._max_tokens(spec, len(ids), job.default_max_tokens)
        min_tokens = max_tokens if spec.ignore_eos else min(spec.min_tokens, max_tokens)
        if job.cancel.is_set():  # the client left while this job waited for the thread
            return Finished("cancelled", len(ids), 0, time.monotonic() - started)
        self.faults.check()

        loaded = self.loaded
        model, device = loaded.model, loaded.device
        eos = sorted(loaded.eos_token_ids)
        generator = None
        if spec.temperature > 0:
            generator = torch.Generator(device=device)
            if spec.seed is None:
                generator.seed()
            else:
                generator.manual_seed(spec.seed)
        detok = _Detokenizer(loaded.tokenizer)
        stops = spec.stop
        longest_stop = max((len(s) for s in stops), default=0)
        sent = 0                                     # characters already emitted
        finish = "length"
        count = 0

        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        while True:
            logits = out.logits[0, -1].float()
            past = out.past_key_values
            del out
            if count < min_tokens and eos:
                logits[eos] = float("-inf")
            token = _select_token(logits, spec.temperature, spec.top_p, generator)
            count += 1
            if token in loaded.eos_token_ids:
                finish = "eos"
                break
            detok.add(token)
            text = detok.text
            if stops:
                at = _find_stop(text, stops, max(0, sent - longest_stop))
                if at >= 0:
                    if at > sent:
                        job.emit(TextDelta(text[sent:at]))
                    sent = at
                    finish = "stop"
                    break
                ready = len(text) - _stop_holdback(text, stops)
            else:
                ready = len(text)
            if ready > sent:
                job.emit(TextDelta(text[sent:ready]))
                sent = ready
            if count >= max_tokens:
                break
            if job.cancel.is_set():
                finish = "cancelled"
                break
            out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
        if finish in ("length", "eos"):  # release what was held back (a stop prefix, half a character)
            detok.flush()
            text = detok.text
            if stops:
                at = _find_stop(text, stops, max(0, sent - longest_stop))
                if at >= 0:
                    text, finish = text[:at], "stop"
            if len(text) > sent:
                job.emit(TextDelta(text[sent:]))
        return Finished("stop" if finish == "eos" else finish, len(ids), count, time.monotonic() - started)

    # -- embeddings --

    def embed(self, spec: EmbeddingSpec, batch_size: int) -> EmbeddingResult:
        with torch.inference_mode():
            return self._guard_oom(self._embed, spec, batch_size)

    def _embed(self, spec: EmbeddingSpec, batch_size: int) -> EmbeddingResult:
        loaded = self.loaded
        tok = loaded.tokenizer
        sequences: list[list[int]] = []
        vocab = len(tok)
        for i, item in enumerate(spec.inputs):
            ids = list(item) if isinstance(item, tuple) else tok.encode(item)
            if any(t < 0 or t >= vocab for t in ids):
                raise InvalidRequest(f"input[{i}]: token ids must be in [0, {vocab})", "input")
            if len(ids) > loaded.context_length:
                raise InvalidRequest(
                    f"input[{i}] has {len(ids)} tokens; this model's maximum context length is "
                    f"{loaded.context_length} tokens.",
                    "input", "context_length_exceeded",
                )
            sequences.append(ids)
        self.faults.check()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        data: list[list[float] | str] = []
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start:start + batch_size]
            width = max(len(s) for s in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                input_ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, :len(seq)] = 1
            input_ids, mask = input_ids.to(loaded.device), mask.to(loaded.device)
            hidden = loaded.model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu()
            if spec.encoding_format == "base64":
                data.extend(base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors)
            else:
                data.extend(vectors.tolist())
        return EmbeddingResult(data, sum(len(s) for s in sequences))

    # -- OOM --

    def _guard_oom(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn`; on a CUDA OOM free the cache (after the failed frames are gone) and raise WorkerOutOfMemory."""
        try:
            return fn(*args)
        except torch.cuda.OutOfMemoryError as exc:
            message = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        # Outside the except block the traceback (and the tensors its frames hold) is released.
        free_device_memory()
        log.warning("out_of_memory", message=message, device=str(self.loaded.device))
        raise WorkerOutOfMemory(message)
