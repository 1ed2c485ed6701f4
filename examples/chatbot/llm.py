"""The chatbot's LLM: a local Hugging Face causal LM by default, any LlamaIndex LLM by flag.

``TransformersLLM`` is a small LlamaIndex ``CustomLLM`` over ``transformers`` so that the
default chatbot runs offline on the CPU (the offline Gemma 3 270M: small, so its answers
are rough; the point of the demo is the retrieval). ``llm_from_spec`` turns a ``--llm`` flag
into an LLM and imports the optional integrations lazily, with a message naming the pip
package when one is missing.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from pydantic import Field, PrivateAttr

from examples.chatbot.repetition import NoRepeatInReply, RepetitionGuard

LLM_SPEC_HELP = (
    "hf (the offline default Gemma 3 270M), hf:PATH (a local Hugging Face causal LM), "
    "ollama:MODEL (needs llama-index-llms-ollama and a running Ollama), "
    "openai-like:URL[#MODEL] (an OpenAI-compatible server, needs "
    "llama-index-llms-openai-like), or mock (echoes the prompt: tests the plumbing only)"
)

# A base (not instruction-tuned) model keeps writing the next turn of the document;
# these markers end its answer there.
DEFAULT_STOP = ("\nQuestion:", "\nuser:", "\nUser:", "\nassistant:", "\n\n\n")


#: Every generation running in this process, by its halt event: stopped at exit (below).
_GENERATIONS: dict[threading.Event, threading.Thread] = {}


@atexit.register
def _stop_generations() -> None:
    """Halt and join what still generates when the interpreter exits: a stream left open (a
    script that stopped reading and kept it) left its daemon thread inside torch, which the
    interpreter's teardown then aborted ("terminate called without an active exception",
    exit status 134)."""
    for halt in list(_GENERATIONS):
        halt.set()
    for worker in list(_GENERATIONS.values()):
        worker.join(timeout=30)


class LLMSpecError(ValueError):
    """A ``--llm`` value that cannot be turned into an LLM; the message says how to fix it."""


def question_answer_prompt(messages: Sequence[ChatMessage]) -> str:
    """Chat messages as a plain question-and-answer document, for models without a template.

    A small base model continues a document: "Question: ...\nAnswer:" after the context is
    a document it has seen often, and it answers; a "user:/assistant:" transcript it mostly
    continues with another question.
    """
    parts = []
    for message in messages:
        text = (message.content or "").strip()
        if message.role == MessageRole.SYSTEM:
            parts.append(text)
        elif message.role == MessageRole.USER:
            parts.append(f"Question: {text}")
        else:
            parts.append(f"Answer: {text}")
    return "\n\n".join(parts) + "\nAnswer:"


class TransformersLLM(CustomLLM):
    """A local causal LM through ``transformers.generate``, streamed token by token.

    Greedy by default (``temperature=0``) so answers are reproducible. The prompt is cut
    from the left when it would not fit, so the question at its end always survives.
    """

    model_path: str = Field(description="Directory (or cached hub id) of a causal LM.")
    max_new_tokens: int = Field(default=256, gt=0)
    # LlamaIndex asks for non-streamed completions for short chores (condensing a follow-up
    # into a standalone question); a small base model would ramble on for max_new_tokens.
    max_complete_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)
    repetition_penalty: float = Field(default=1.15, gt=0.0)
    # Tokens: no n-gram of the reply is generated twice (the prompt does not count, so the
    # context can still be quoted). Off by default: a looping model then writes near-copies
    # ("a dog ..." -> "aa dog ...") that no guard recognises, where without it the guard cuts
    # the loop at its first exact repeat.
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    # Cut the reply at its first repeated line or sentence (see repetition.RepetitionGuard).
    repetition_guard: bool = Field(default=True)
    # What LlamaIndex packs into one prompt (long prompts are slow on a CPU); a longer prompt
    # is cut to the model's own limit from the left.
    context_window: int = Field(default=4096, gt=0)
    stop: tuple[str, ...] = Field(default=DEFAULT_STOP)
    device: str | None = Field(default=None, description="None: CUDA when present, else CPU.")
    dtype: str = Field(default="auto")
    trust_remote_code: bool = Field(default=False)

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _running: set[threading.Event] = PrivateAttr(default_factory=set)  # halts of open streams

    def __init__(self, model_path: str | Path | None = None, **kwargs: Any) -> None:
        if model_path is None:
            from llama_index_d2llm.student.backbone import default_backbone_path

            model_path = default_backbone_path()
        super().__init__(model_path=str(model_path), **kwargs)
        self._load()
        if "messages_to_prompt" not in kwargs:
            self.messages_to_prompt = self._chat_template_prompt

    @classmethod
    def class_name(cls) -> str:
        return "TransformersLLM"

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llama_index_d2llm.student.backbone import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(
                self.model_path, trust_remote_code=self.trust_remote_code)
            self._model = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=dtype, trust_remote_code=self.trust_remote_code)
        except OSError as exc:
            raise LLMSpecError(
                f"could not load a causal LM from {self.model_path!r} ({exc}); pass "
                "--llm hf:DIR with a local Hugging Face model directory, or --llm hf for the "
                "offline default"
            ) from exc
        self._model.to(device).eval()

    @property
    def input_limit(self) -> int:
        """Tokens the model can take: ``context_window`` or its positions, the smaller."""
        positions = getattr(self._model.config, "max_position_embeddings", None)
        return min(self.context_window, int(positions or self.context_window))

    @property
    def has_chat_template(self) -> bool:
        """An instruction-tuned model ships a chat template; a base model does not."""
        return bool(getattr(self._tokenizer, "chat_template", None))

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           is_chat_model=False, model_name=self.model_path,
                           system_role=MessageRole.SYSTEM)

    def _chat_template_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The model's own chat template when it has one, else a plain transcript."""
        if self.has_chat_template:
            turns = [{"role": m.role.value, "content": m.content or ""} for m in messages]
            return self._tokenizer.apply_chat_template(turns, tokenize=False,
                                                       add_generation_prompt=True)
        return question_answer_prompt(messages)

    # ------------------------------------------------------------------ generation
    def interrupt(self) -> None:
        """Stop every generation in progress after its current token (from any thread).

        A reader that goes away (a closed browser tab) must not leave the model generating
        for nobody while it holds the lock every later answer waits for.
        """
        for halt in list(self._running):
            halt.set()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text = ""
        limit = min(self.max_new_tokens, self.max_complete_tokens)
        for response in self._stream(prompt, formatted, limit):
            text = response.text
        return CompletionResponse(text=text.strip())

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False,
                        **kwargs: Any) -> CompletionResponseGen:
        return self._stream(prompt, formatted)

    def _stream(self, prompt: str, formatted: bool,
                max_new_tokens: int | None = None) -> CompletionResponseGen:
        """Generate in a thread; yield text as it comes; stop at a stop marker or on close."""
        import torch
        from transformers import (
            LogitsProcessorList,
            StoppingCriteria,
            StoppingCriteriaList,
            TextIteratorStreamer,
        )

        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        tokenizer, model = self._tokenizer, self._model
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
        max_new_tokens = max_new_tokens or self.max_new_tokens
        budget = max(1, self.input_limit - max_new_tokens)
        if ids.shape[1] > budget:  # keep the end: it holds the question
            ids = ids[:, -budget:]
        ids = ids.to(model.device)
        halt = threading.Event()

        class _Halt(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return halt.is_set()

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = ({"do_sample": True, "temperature": self.temperature}
                    if self.temperature > 0 else {"do_sample": False})
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        processors = LogitsProcessorList()
        if self.no_repeat_ngram_size:
            processors.append(NoRepeatInReply(self.no_repeat_ngram_size, ids.shape[1]))
        guard = RepetitionGuard() if self.repetition_guard else None
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with self._lock, torch.inference_mode():
                    model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        repetition_penalty=self.repetition_penalty, pad_token_id=pad_id,
                        stopping_criteria=StoppingCriteriaList([_Halt()]), streamer=streamer,
                        logits_processor=processors, **sampling)
            except BaseException as exc:  # surfaced in the consumer's thread below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=generate, name="llm-generate", daemon=True)
        self._running.add(halt)
        _GENERATIONS[halt] = worker
        worker.start()
        text = shown = ""
        finished = False
        try:
            for delta in streamer:
                text, delta, stopped = _cut_at_stop(text, delta, self.stop)
                if guard is not None:
                    delta = guard.feed(delta)
                    stopped = stopped or guard.stopped
                if delta:
                    shown += delta
                    yield CompletionResponse(text=shown, delta=delta)
                if stopped:
                    break
            else:
                finished = True
            rest = guard.flush() if guard is not None else ""
            if rest:
                shown += rest
                yield CompletionResponse(text=shown, delta=rest)
        finally:
            halt.set()
            if not finished:  # stopped early: drain so the worker's last put never blocks
                for _ in streamer:
                    pass
            worker.join()
            self._running.discard(halt)
            _GENERATIONS.pop(halt, None)
        if failure:
            raise failure[0]


def _cut_at_stop(text: str, delta: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Append ``delta``; if a stop marker now appears, cut before it. Returns the new delta."""
    combined = text + delta
    cut = min((i for i in (combined.find(s) for s in stops) if i >= 0), default=-1)
    if cut < 0:
        return combined, delta, False
    kept = combined[:cut]
    return kept, kept[len(text):], True


def llm_from_spec(spec: str, *, max_new_tokens: int = 256) -> Any:
    """``--llm`` value -> a LlamaIndex LLM. See ``LLM_SPEC_HELP`` for the forms."""
    kind, _, target = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "hf":
        return TransformersLLM(target or None, max_new_tokens=max_new_tokens)
    if kind == "mock":
        from llama_index.core.llms import MockLLM

        return MockLLM(max_tokens=max_new_tokens)
    if kind == "ollama":
        if not target:
            raise LLMSpecError("--llm ollama needs a model name: --llm ollama:llama3.2")
        module = _optional("llama_index.llms.ollama", "llama-index-llms-ollama")
        return module.Ollama(model=target, request_timeout=300.0)
    if kind == "openai-like":
        url, _, model = target.partition("#")
        if not url:
            raise LLMSpecError("--llm openai-like needs a server URL: "
                               "--llm openai-like:http://127.0.0.1:8080/v1#MODEL")
        module = _optional("llama_index.llms.openai_like", "llama-index-llms-openai-like")
        return module.OpenAILike(api_base=url, model=model or "default", api_key="unused",
                                 is_chat_model=True, max_tokens=max_new_tokens)
    raise LLMSpecError(f"unknown --llm {spec!r}: use {LLM_SPEC_HELP}")


def _optional(module_name: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise LLMSpecError(
            f"this --llm needs the {package} package, which is not installed: "
            f"pip install {package}"
        ) from exc
