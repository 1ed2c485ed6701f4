"""Stage 4: the teacher, an LLM cross-encoder that scores (query, passage) pairs.

Two ways of reading a relevance judgement out of a causal LM:

- ``yesno`` (the paper): query, passage and an instruction in one prompt; the logits of "yes"
  and "no" as the next token give ``z_T = yes - no`` and ``s_T = softmax([yes, no])[yes]``.
  Needs a model that follows instructions.
- ``query-likelihood``: ``z_T`` = mean log P(query tokens | passage prompt). A base model
  cannot follow the yes/no instruction but scores query likelihood well (the README's
  "Teacher modes"; figures in ``benchmarks/results/``).

``mode="auto"`` picks ``yesno`` for chat/instruction-tuned models (the tokenizer has a chat
template) and ``query-likelihood`` otherwise.

Only the body of the transformer runs over the whole sequence: the LM head projects onto the
vocabulary (262k tokens for Gemma 3), which would cost more than the transformer. ``yesno``
takes two rows of the head at one position; query likelihood needs the log-softmax normaliser,
so it projects onto the vocabulary only at the positions that predict query tokens, in chunks.
Scores go to a disk cache as they are computed (``cache.cached_rows``), so an interrupted run
resumes and a second distillation with the same teacher scores nothing twice. The settings are
a ``TeacherConfig`` (``teacher_config.py``); generation for query writing is in
``generation.py``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student.backbone import (
    DEFAULT_BACKBONE_NAME,
    is_default_llm,
    load_pretrained,
    load_tokenizer,
    refuse_remote_code,
    resolve_backbone,
    resolve_device,
    resolve_dtype,
)
from llama_index_d2llm.student.batching import (
    activation_bytes_per_token,
    auto_batch_size,
    length_batches,
)
from llama_index_d2llm.student.tasks import TASKS
from llama_index_d2llm.trainer.cache import RowChunks, TensorRowCache, cached_rows, content_key
from llama_index_d2llm.trainer.generation import generate_continuations
from llama_index_d2llm.trainer.prompts import (
    PairTemplate,
    query_likelihood_template,
    yesno_template,
)
from llama_index_d2llm.trainer.teacher_config import (  # re-exported: users import them here
    DEFAULT_QL_CENTER,
    DEFAULT_QL_SCALE,
    MODES,
    TeacherConfig,
    TeacherError,
)
from llama_index_d2llm.trainer.teacher_head import LMHead
from llama_index_d2llm.trainer.teacher_tokens import (
    EncodedPair,
    encode_pair,
    pad_batch,
    query_spans,
)

__all__ = ["DEFAULT_QL_CENTER", "DEFAULT_QL_SCALE", "MODES", "TASKS", "Teacher",
           "TeacherConfig", "TeacherError", "TeacherScores"]

logger = logging.getLogger(__name__)

SCORING_VERSION = "teacher-v1"
_YES_NO_CANDIDATES = ((" yes", " no"), ("yes", "no"), (" Yes", " No"), ("Yes", "No"))
_CHAT_YES_NO_CANDIDATES = (("Yes", "No"), ("yes", "no"), (" Yes", " No"), (" yes", " no"))
#: Pairs per teacher batch on the CPU when the batch size is automatic.
CPU_BATCH_SIZE = 8


@dataclass
class TeacherScores:
    """The teacher's view of n pairs: what the student imitates."""

    logits: torch.Tensor  # (n,) z_T
    probs: torch.Tensor  # (n,) s_T in [0, 1]
    features: torch.Tensor  # (n, hidden) y_T, float32

    def __len__(self) -> int:
        return int(self.logits.shape[0])


class Teacher:
    """An LLM cross-encoder. Build with ``from_pretrained``.

    Settings: a ``TeacherConfig`` as ``config``, or its fields as keyword arguments (they
    override ``config``'s).
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str,
                 config: TeacherConfig | None = None, cache_dir: Path | None = None,
                 **settings: Any):
        config = (config or TeacherConfig()).updated(**settings)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        mode = config.mode
        if mode == "auto":
            mode = "yesno" if self.has_chat_template else "query-likelihood"
        self.config = config
        self.mode = mode
        self.max_length = config.max_length
        self.batch_size = config.batch_size
        self.prompt_order = config.prompt_order
        self.ql_center = config.ql_center
        self.ql_scale = config.ql_scale
        self.use_chat_template = (mode == "yesno" and self.has_chat_template
                                  if config.use_chat_template is None
                                  else config.use_chat_template)
        self.body = model.get_decoder()
        head = model.get_output_embeddings()
        self._head_weight: torch.Tensor = head.weight
        self.head = LMHead(head.weight, getattr(head, "bias", None),
                           getattr(model.config, "final_logit_softcapping", None))
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        self._bos = [bos] if bos is not None and probe and probe[0] == bos else []
        self.templates = {task: self._template(task, (config.templates or {}).get(task))
                          for task in TASKS}
        self.yes_id, self.no_id = (self._answer_ids(config.yes_token, config.no_token)
                                   if mode == "yesno" else (None, None))
        self.fingerprint = self._compute_fingerprint()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache = (TensorRowCache(self.cache_dir / "teacher-scores" / self.fingerprint)
                       if self.cache_dir is not None else None)
        self._warned_truncation = False

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, *,
                        device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = "auto", cache_dir: Path | None = None,
                        trust_remote_code: bool = False, config: TeacherConfig | None = None,
                        **settings: Any) -> Teacher:
        """Load a causal LM (hub id cached locally, or a directory; None: offline Gemma 3 270M).

        ``settings``: ``TeacherConfig`` fields (``mode``, ``max_length``, ``batch_size``,
        ``prompt_order``, ``use_chat_template``, ``templates``, ``yes_token``, ``no_token``,
        ``ql_center``, ``ql_scale``).
        """
        from transformers import AutoModelForCausalLM

        config = (config or TeacherConfig()).updated(**settings)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        path = name_or_path
        try:
            path = resolve_backbone(name_or_path)
            tokenizer = load_tokenizer(path, trust_remote_code)
            model = load_pretrained(AutoModelForCausalLM, path, dtype=dtype,
                                    trust_remote_code=trust_remote_code)
        except ValueError as exc:
            refuse_remote_code(path, exc)
            raise
        except OSError as exc:
            raise TeacherError(
                f"could not load the teacher {path!r}: {exc}. Pass a local directory with a "
                "Hugging Face causal LM, a hub id that is cached locally, or no name for the "
                "offline default"
            ) from exc
        model.to(device)
        name = DEFAULT_BACKBONE_NAME if is_default_llm(name_or_path) else name_or_path
        return cls(model, tokenizer, name=name, config=config, cache_dir=cache_dir)

    # ------------------------------------------------------------------ identity and prompts
    @property
    def device(self) -> torch.device:
        return self._head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._head_weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self._head_weight.shape[1])

    def _template(self, task: str, override: str | None) -> PairTemplate:
        if override is not None:
            text = override
        elif self.mode == "yesno":
            text = yesno_template(task, self.prompt_order)  # type: ignore[arg-type]
        else:
            text = query_likelihood_template(task)  # type: ignore[arg-type]
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            bos_text = self.tokenizer.bos_token
            if self._bos and bos_text and text.startswith(bos_text):
                text = text[len(bos_text):]  # _encode adds the <bos> id itself, once
        template = PairTemplate(text)
        if self.mode == "query-likelihood" and not template.query_is_last:
            raise TeacherError(f"a query-likelihood template must end with {{query}} (its tokens "
                               f"are the ones scored): {text!r}")
        return template

    def _answer_ids(self, yes_token: str | None, no_token: str | None) -> tuple[int, int]:
        """Single-token ids of the answers, checked now rather than after an hour of scoring."""
        if (yes_token is None) != (no_token is None):
            raise TeacherError("pass both yes_token and no_token, or neither")
        if yes_token is not None:
            candidates: tuple[tuple[str, str], ...] = ((yes_token, no_token),)  # type: ignore
        else:
            candidates = _CHAT_YES_NO_CANDIDATES if self.use_chat_template else _YES_NO_CANDIDATES
        for yes, no in candidates:
            yes_ids = self.tokenizer.encode(yes, add_special_tokens=False)
            no_ids = self.tokenizer.encode(no, add_special_tokens=False)
            if len(yes_ids) == 1 and len(no_ids) == 1:
                return yes_ids[0], no_ids[0]
        tried = ", ".join(f"{y!r}/{n!r}" for y, n in candidates)
        raise TeacherError(
            f"the teacher's tokenizer has no single token for the answers ({tried}), so yes/no "
            "scoring cannot read them: use mode='query-likelihood', or pass yes_token/no_token "
            "that are single tokens of this tokenizer"
        )

    def _compute_fingerprint(self) -> str:
        """Model (config + a sample of every weight, not its path) + mode + prompts."""
        config = {key: value for key, value in self.model.config.to_dict().items()
                  if not key.startswith("_") and key not in ("transformers_version",)}
        digest = hashlib.sha256()
        for name, param in sorted(self.model.state_dict().items()):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(flat[::step][:256].to("cpu", torch.float32).numpy().tobytes())
        return content_key(
            SCORING_VERSION, self.name if self.name == DEFAULT_BACKBONE_NAME else None, config,
            digest.hexdigest(), self.mode, {t: p.text for t, p in self.templates.items()},
            self.yes_id, self.no_id, self.max_length, str(self.dtype),
        )[:16]

    def prompt(self, query: str, passage: str, task: str = "asymmetric") -> str:
        """The prompt text for one pair (untruncated), for inspection."""
        return self.templates[self._check_task(task)].render(query, passage)

    # ------------------------------------------------------------------ tokenization
    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _encode(self, template: PairTemplate, query: str, passage: str) -> EncodedPair:
        """Token ids of one prompt. Too long: the passage is cut, never the instruction."""
        return encode_pair(template, query, passage, encode_text=self._encode_text,
                           bos=self._bos, max_length=self.max_length)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in a prompt (no special tokens)."""
        return len(self._encode_text(text))

    def truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut to its first ``max_tokens`` tokens (for prompts built outside)."""
        ids = self._encode_text(text)
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])

    # ------------------------------------------------------------------ scoring
    def _check_task(self, task: str) -> str:
        if task not in TASKS:
            raise ValueError(f"task must be 'asymmetric' or 'symmetric', got {task!r}")
        return task

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """s_T from z_T. yesno: sigmoid(yes - no) = softmax([yes, no])[yes]."""
        if self.mode == "yesno":
            return torch.sigmoid(logits)
        return torch.sigmoid((logits - self.ql_center) / self.ql_scale)

    def pair_keys(self, queries: Sequence[str], passages: Sequence[str],
                  task: str = "asymmetric") -> list[str]:
        template = self.templates[self._check_task(task)].text
        return [content_key(self.fingerprint, self.mode, task, template, q, p)
                for q, p in zip(queries, passages, strict=True)]

    def score(self, queries: Sequence[str], passages: Sequence[str], task: str = "asymmetric",
              show_progress: bool = False, cache_every: int = 256,
              cache_seconds: float = 60.0) -> TeacherScores:
        """Scores of the pairs (queries[i], passages[i]), cached when the teacher has a cache.

        Results are written every ``cache_every`` pairs or ``cache_seconds`` seconds, whichever
        comes first, so an interruption loses at most that much work.
        """
        queries, passages = list(queries), list(passages)
        if len(queries) != len(passages):
            raise ValueError(f"score() pairs queries[i] with passages[i]: got {len(queries)} "
                             f"queries and {len(passages)} passages")
        for kind, texts in (("query", queries), ("passage", passages)):
            empty = [i for i, text in enumerate(texts) if not str(text).strip()]
            if empty:
                raise ValueError(f"{kind} texts at positions {empty[:5]} are empty: the teacher "
                                 "cannot judge an empty text; drop those pairs")
        task = self._check_task(task)
        keys = self.pair_keys(queries, passages, task)

        def compute(positions: list[int]) -> RowChunks:
            for chunk_keys, logits, features in self._score_positions(
                    positions, queries, passages, keys, task, show_progress, cache_every,
                    cache_seconds):
                yield chunk_keys, {"logits": logits, "features": features}

        rows = cached_rows(self._cache, keys, compute)
        if not keys:
            rows = {"logits": torch.empty(0), "features": torch.empty(0, self.hidden_size)}
        logits = rows["logits"].float()
        return TeacherScores(logits, self.probabilities(logits), rows["features"].float())

    def _score_positions(self, positions: list[int], queries: list[str], passages: list[str],
                         keys: list[str], task: str, show_progress: bool, cache_every: int,
                         cache_seconds: float):
        """Yield (keys, logits, features) every ``cache_every`` pairs or ``cache_seconds``
        seconds; batches are sorted by length so that they pad little."""
        template = self.templates[task]
        encoded = {i: self._encode(template, queries[i], passages[i]) for i in positions}
        truncated = sum(encoded[i].truncated for i in positions)
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning("%d of %d teacher prompts exceed max_length=%d: their passages were "
                           "shortened (the instruction and query are kept)", truncated,
                           len(positions), self.max_length)
        lengths = [len(encoded[i].ids) for i in positions]
        batches = [[positions[j] for j in batch]
                   for batch in length_batches(lengths, self._batch_size_for)]
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(positions), desc=f"teacher scoring ({self.mode})",
                            unit="pair")
        done_keys: list[str] = []
        done_logits: list[torch.Tensor] = []
        done_features: list[torch.Tensor] = []
        last_yield = time.monotonic()
        try:
            for batch in batches:
                logits, features = self._forward([encoded[i] for i in batch])
                done_keys.extend(keys[i] for i in batch)
                done_logits.append(logits)
                done_features.append(features)
                if progress is not None:
                    progress.update(len(batch))
                if (len(done_keys) >= cache_every
                        or time.monotonic() - last_yield >= cache_seconds):
                    yield done_keys, torch.cat(done_logits), torch.cat(done_features)
                    done_keys, done_logits, done_features = [], [], []
                    last_yield = time.monotonic()
            if done_keys:
                yield done_keys, torch.cat(done_logits), torch.cat(done_features)
        finally:
            if progress is not None:
                progress.close()

    def _batch_size_for(self, width: int) -> int:
        """Pairs per batch of prompts ``width`` tokens long: the set batch size, else from the
        device's free memory (``student/batching.py``; CPU_BATCH_SIZE on the CPU)."""
        if self.batch_size is not None:
            return self.batch_size
        config = self.model.config
        per_token = activation_bytes_per_token(
            self.hidden_size, getattr(config, "intermediate_size", None), self.dtype.itemsize)
        return auto_batch_size(self.device, width, bytes_per_token=per_token,
                               cpu_size=CPU_BATCH_SIZE)

    @torch.inference_mode()
    def _forward(self, batch: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B,), features (B, hidden)) for one batch, on the CPU in float32."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, mask, lengths = pad_batch(batch, pad, self.device)
        hidden = self.body(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if self.mode == "yesno":
            return self.head.yesno(hidden, lengths, self.yes_id, self.no_id)
        starts, ends = query_spans(batch, self.device)
        return self.head.query_likelihood(hidden, input_ids, starts, ends)

    def _head_logits(self, states: torch.Tensor, rows: torch.Tensor | slice | None = None
                     ) -> torch.Tensor:
        """LM-head logits of ``states`` for the vocabulary ``rows`` only (all when None)."""
        return self.head.logits(states, rows)

    def _log_normaliser(self, states: torch.Tensor) -> torch.Tensor:
        """The log-softmax normaliser at each of ``states`` (``LMHead.log_normaliser``)."""
        return self.head.log_normaliser(states)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, *,
                 do_sample: bool = False, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int | None = None, stop_at_newline: bool = True,
                 max_prompt_tokens: int | None = None) -> list[str]:
        """Continuations of ``prompts`` (new text only), one batch, greedy unless sampling.

        Generation stops at the first newline after some text (one line is one query). A
        prompt longer than ``max_prompt_tokens`` (default: the teacher's max length less the
        new tokens) keeps its end, which is what the continuation follows; callers that build
        few-shot prompts shorten their passage instead, so that the examples stay whole.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        budget = max_prompt_tokens or self.max_length - max_new_tokens
        encoded, cut = [], []
        for prompt in prompts:
            ids = self._bos + self._encode_text(prompt)
            if len(ids) > budget:
                cut.append(len(ids))
                ids = self._bos + ids[len(ids) - budget + len(self._bos):]
            encoded.append(ids)
        if cut:
            logger.warning("%d of %d generation prompts (up to %d tokens) were cut to their "
                           "last %d tokens", len(cut), len(prompts), max(cut), budget)
        return generate_continuations(
            self.model, self.tokenizer, encoded, max_new_tokens, device=self.device,
            do_sample=do_sample,
            temperature=temperature, top_p=top_p, seed=seed, stop_at_newline=stop_at_newline)
