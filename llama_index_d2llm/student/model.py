"""The D2LLM student: an LLM bi-encoder (optionally LoRA-tuned) + PMA pooling + the IEM head.

Used by both the LlamaIndex classes (inference) and the trainer (training); it knows
nothing of either.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from llama_index_d2llm.student.backbone import (
    DEFAULT_BACKBONE_NAME,
    load_body,
    load_tokenizer,
    resolve_backbone,
    resolve_device,
    resolve_dtype,
)
from llama_index_d2llm.student.batching import (
    activation_bytes_per_token,
    auto_batch_size,
    in_input_order,
    length_batches,
)
from llama_index_d2llm.student.body import (
    check_max_lengths,
    max_positions,
    no_cache_kwargs,
    truncate_layers,
)
from llama_index_d2llm.student.checkpoint import hidden_size, load_student, save_student
from llama_index_d2llm.student.config import D2LLMConfig, LoraSettings
from llama_index_d2llm.student.fusion import (
    FusionWeights,
    check_first_stage,
    default_fusion,
    fuse,
)
from llama_index_d2llm.student.iem import InteractionEmulation
from llama_index_d2llm.student.lora import is_peft, wrap_lora
from llama_index_d2llm.student.modes import eval_mode
from llama_index_d2llm.student.pma import PMAPooling
from llama_index_d2llm.student.pooling import declared_pooling, declared_prompts
from llama_index_d2llm.student.storage import FINGERPRINT_VERSION_KEY, compute_fingerprint
from llama_index_d2llm.student.tasks import Task
from llama_index_d2llm.student.texts import check_texts, check_unicode

logger = logging.getLogger(__name__)

TextKind = Literal["query", "passage"]
#: ``from_backbone(base_pooling=AUTO)``: the pooling the model declares, else mean pooling.
AUTO = "auto"
VectorsLike = torch.Tensor | np.ndarray | Sequence[Sequence[float]] | Sequence[float]

def _as_float_tensor(values: VectorsLike) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.float()
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


class D2LLMStudent(nn.Module):
    """Backbone + PMA + IEM. Build with ``from_backbone`` or load with ``from_pretrained``."""

    def __init__(self, config: D2LLMConfig, backbone: nn.Module, tokenizer: Any,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pma = PMAPooling(config.hidden_size, config.pma_heads, config.pma_ffn_size,
                              base_pooling=config.base_pooling)
        self.iem = InteractionEmulation(config.hidden_size, config.iem_hidden_size,
                                        cosine_skip=config.iem_cosine_skip)
        self.backbone_dtype = dtype
        self._loaded_fingerprint: str | None = None
        self._warned_truncation: set[str] = set()
        #: the body's position limit: no text is cut longer, whatever the config says
        self.position_limit = max_positions(self.body.config, tokenizer)
        self._special_tail: int | None = None
        self.to(device)
        self.backbone.to(dtype)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | None = None,
        *,
        backbone_layers: int | None = None,
        lora: LoraSettings | None = LoraSettings(),  # noqa: B008 - dataclass is immutable in use
        pma_heads: int = 32,
        pma_ffn_size: int | None = None,
        iem_hidden_size: int = 512,
        iem_cosine_skip: bool = True,
        max_query_length: int = 64,
        max_passage_length: int = 256,
        base_pooling: str | None = AUTO,
        query_instruction: str | None = None,
        passage_instruction: str | None = None,
        normalize: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        seed: int | None = None,
    ) -> D2LLMStudent:
        """A new student around a Hugging Face encoder or causal LM (hub id or local directory).

        With no name, the offline default Gemma 3 270M (converted once, then cached).
        ``backbone_layers`` keeps only the first N transformer layers (faster, and a middle
        layer is often the better embedding).

        ``base_pooling="auto"`` starts from the pooling the model declares (a
        sentence-transformers folder: mean for all-MiniLM-L6-v2, CLS for bge), else from mean
        pooling; ``None`` is the paper's PMA alone (``pooling.py``). With a base pooling the
        untrained student embeds exactly as that pooling does, and its IEM ranks as the
        cosine does: distillation starts from the encoder, not from random heads.
        Instructions (``None``: automatic) are the prompts a sentence-transformers model
        declares (none for all-MiniLM-L6-v2), else "Query: " and "Passage: ".
        """
        if seed is not None:
            torch.manual_seed(seed)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        path = resolve_backbone(name_or_path)
        tokenizer = load_tokenizer(path, trust_remote_code)
        body = truncate_layers(load_body(path, dtype, trust_remote_code), backbone_layers)
        check_max_lengths(body.config, tokenizer, name_or_path or DEFAULT_BACKBONE_NAME,
                          query=max_query_length, passage=max_passage_length)
        declared = declared_pooling(path)
        if base_pooling == AUTO:
            base_pooling = declared or "mean"
        prompts = declared_prompts(path) if declared else None
        if query_instruction is None:
            query_instruction = prompts[0] if prompts else "Query: "
        if passage_instruction is None:
            passage_instruction = prompts[1] if prompts else "Passage: "
        config = D2LLMConfig(
            backbone=name_or_path, backbone_layers=backbone_layers,
            hidden_size=hidden_size(body), pma_heads=pma_heads, base_pooling=base_pooling,
            pma_ffn_size=pma_ffn_size, iem_hidden_size=iem_hidden_size,
            iem_cosine_skip=iem_cosine_skip,
            max_query_length=max_query_length, max_passage_length=max_passage_length,
            query_instruction=query_instruction, passage_instruction=passage_instruction,
            normalize=normalize, lora=copy.deepcopy(lora), trust_remote_code=trust_remote_code,
            extra={FINGERPRINT_VERSION_KEY: 2},
        )
        if lora is not None:
            body = wrap_lora(body, lora)
        return cls(config, body, tokenizer, device, dtype)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        trainable: bool = False,
        trust_remote_code: bool | None = None,
    ) -> D2LLMStudent:
        """Load a saved student. ``trainable=False`` merges LoRA into the backbone (faster).

        Code shipped with the backbone runs only with ``trust_remote_code=True`` from the
        caller: the student directory's own ``trust_remote_code`` is data from whoever wrote
        it, so it can ask for the flag but never turn it on (``checkpoint.py``).
        """
        return load_student(cls, directory, device=device, dtype=dtype, trainable=trainable,
                            trust_remote_code=trust_remote_code)

    # ------------------------------------------------------------------ identity
    def heads_module(self) -> nn.ModuleDict:
        """PMA and IEM together: the weights saved in ``heads.safetensors``."""
        return nn.ModuleDict({"pma": self.pma, "iem": self.iem})

    def adapter_state_dict(self) -> dict[str, torch.Tensor] | None:
        if not is_peft(self.backbone):
            return None
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.backbone)

    @property
    def fingerprint(self) -> str:
        """Hash of the weights that determine the vectors and scores (changes when trained)."""
        if self._loaded_fingerprint is not None:
            return self._loaded_fingerprint
        return compute_fingerprint(self.config, self.heads_module().state_dict(),
                                   self.adapter_state_dict())

    @property
    def name(self) -> str:
        backbone = self.config.backbone or DEFAULT_BACKBONE_NAME
        return f"D2LLM student on {backbone} ({self.fingerprint})"

    @property
    def body(self) -> nn.Module:
        """The Hugging Face transformer body, unwrapped from peft (LoRA layers included)."""
        return self.backbone.get_base_model() if is_peft(self.backbone) else self.backbone

    @property
    def device(self) -> torch.device:
        return self.pma.seed.device

    @property
    def dimension(self) -> int:
        return self.config.hidden_size

    # ------------------------------------------------------------------ encoding
    def max_length(self, kind: TextKind) -> int:
        """The token limit of a text kind: the config's, within the body's position limit."""
        limit = self.config.max_query_length if kind == "query" else self.config.max_passage_length
        return min(limit, self.position_limit) if self.position_limit else limit

    def _special_tokens_at_end(self) -> int:
        """How many special tokens the tokenizer appends ([SEP] for BERT, none for Gemma)."""
        if self._special_tail is None:
            bare = self.tokenizer("a b", add_special_tokens=False)["input_ids"]
            full = self.tokenizer("a b", add_special_tokens=True)["input_ids"]
            starts = [i for i in range(len(full) - len(bare) + 1)
                      if full[i:i + len(bare)] == bare]
            self._special_tail = len(full) - len(bare) - starts[0] if starts and bare else 0
        return self._special_tail

    def tokenize(self, texts: Sequence[str], kind: TextKind = "passage") -> dict[str, torch.Tensor]:
        """Instruction + text, truncated at the end to the student's max length, padded."""
        if kind not in ("query", "passage"):
            raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
        check_texts(texts)
        instruction = (self.config.query_instruction if kind == "query"
                       else self.config.passage_instruction)
        check_unicode(instruction, f"the {kind} instruction")
        limit = self.max_length(kind)
        encoded = self.tokenizer([instruction + t for t in texts], add_special_tokens=True,
                                 truncation=False, padding=False)
        ids = encoded["input_ids"]
        longest = max((len(x) for x in ids), default=0)
        if longest > limit:
            # cut the text, keep what the tokenizer appends after it (an encoder's [SEP])
            tail = self._special_tokens_at_end()
            ids = [x if len(x) <= limit else x[:limit - tail] + x[len(x) - tail:] for x in ids]
            message = (f"{kind} texts longer than max_{kind}_length={limit} tokens (longest "
                       f"{longest}) are truncated; raise the limit or split the text")
            if kind not in self._warned_truncation:
                logger.warning(message)
                self._warned_truncation.add(kind)
        padded = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in padded.items()
                if k in ("input_ids", "attention_mask")}

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states of the backbone, as float32."""
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               **no_cache_kwargs(self.body))
        return output.last_hidden_state.float()

    def pool(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """PMA over token states, then L2 normalisation when the config asks for it.

        Vectors are normalised here, by the student, because Qdrant's cosine collections
        store normalised vectors: the IEM then sees the same vectors in training and after
        a round trip through the store.
        """
        vectors = self.pma(token_states.float(), attention_mask)
        if self.config.normalize:
            vectors = nn.functional.normalize(vectors, dim=-1)
        return vectors

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Vectors for a tokenized batch, with gradients when training."""
        return self.pool(self.token_states(batch["input_ids"], batch["attention_mask"]),
                         batch["attention_mask"])

    def encode(self, texts: Sequence[str], kind: TextKind = "passage",
               batch_size: int | None = None, show_progress: bool = False) -> torch.Tensor:
        """One float32 vector per text, in input order, shape ``(len(texts), dimension)``.

        Texts are sorted by length internally so that each batch pads little. ``batch_size``
        None: 16 on the CPU, from the free memory on CUDA (``batching.py``). The vectors stay
        on the device until the last batch, then come to the host in one copy.
        """
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dimension)
        check_texts(texts)  # here too: an error names the text by its place in the input
        lengths = [len(t) for t in texts]
        batches = length_batches(lengths, batch_size or self._auto_batch_size(kind))
        steps = batches
        if show_progress:
            from tqdm.auto import tqdm

            steps = tqdm(batches, desc=f"encoding {kind}s", unit="batch")
        with eval_mode(self), torch.inference_mode():
            results = [self.embed(self.tokenize([texts[i] for i in index], kind)).float()
                       for index in steps]
        return in_input_order(batches, results).cpu()

    def _auto_batch_size(self, kind: TextKind) -> Callable[[int], int]:
        """Texts per batch from the longest text's characters (a bound on its tokens, which
        the max length caps): 16 on the CPU."""
        limit = self.max_length(kind) + 8  # the instruction and special tokens
        config = getattr(self.body, "config", None)
        per_token = activation_bytes_per_token(
            self.config.hidden_size, getattr(config, "intermediate_size", None),
            self.backbone_dtype.itemsize)
        return lambda chars: auto_batch_size(self.device, min(chars + 8, limit),
                                             bytes_per_token=per_token, cpu_size=16)

    # ------------------------------------------------------------------ scoring
    def score(self, query_vectors: VectorsLike, passage_vectors: VectorsLike,
              task: Task = "asymmetric") -> torch.Tensor:
        """IEM logits: ``(N,)`` for one query and N passages, ``(Q, N)`` for Q queries.

        Passages may be ``(N, d)`` (shared) or ``(Q, N, d)`` (one list per query).
        """
        queries = _as_float_tensor(query_vectors).to(self.device)
        passages = _as_float_tensor(passage_vectors).to(self.device)
        if passages.numel() == 0:
            return torch.empty(passages.shape[:-1] if passages.dim() > 1 else (0,))
        with torch.inference_mode():
            return self.iem(queries, passages, task).float().cpu()

    def fusion(self, first_stage: str = "dense") -> FusionWeights | None:
        """How this first stage's candidates are rescored (``fusion.py``): what the distiller
        recorded, else the default fusion; ``None`` keeps the first stage's order."""
        stage = check_first_stage(first_stage)
        if stage in self.config.fusion:
            return self.config.fusion[stage]
        return default_fusion(stage)

    def rescore(self, query_vector: VectorsLike, passage_vectors: VectorsLike,
                first_stage: str = "dense", task: Task = "asymmetric",
                lexical_scores: VectorsLike | None = None,
                fusion: FusionWeights | None | str = "recorded") -> torch.Tensor:
        """Final scores of first-stage candidates, given best first: their cosine, BM25 score
        (``lexical_scores``, hybrid search) and IEM logit fused by the weights recorded for
        that first stage (or ``fusion``). ``(N,)`` for one query, ``(Q, N)`` for
        ``(Q, N, d)`` passage lists. Higher is better.
        """
        weights = self.fusion(first_stage) if fusion == "recorded" else fusion
        passages = _as_float_tensor(passage_vectors)
        if passages.numel() == 0:
            return torch.empty(passages.shape[:-1] if passages.dim() > 1 else (0,))
        query = torch.nn.functional.normalize(_as_float_tensor(query_vector), dim=-1)
        unit = torch.nn.functional.normalize(passages, dim=-1)
        cosine = (unit @ query if query.dim() == 1 else torch.einsum("qnd,qd->qn", unit, query))
        logits = (self.score(query_vector, passages, task=task)
                  if weights is not None and weights.iem > 0 else torch.zeros_like(cosine))
        lexical = None if lexical_scores is None else _as_float_tensor(lexical_scores)
        return fuse(cosine, logits, weights, lexical).float()

    # ------------------------------------------------------------------ saving
    def merge_lora(self) -> None:
        """Fold LoRA into the backbone weights for inference (about 2x faster on CPU)."""
        if is_peft(self.backbone):
            self._loaded_fingerprint = self.fingerprint
            self.backbone = self.backbone.merge_and_unload()

    def save_pretrained(self, directory: str | os.PathLike, merged: bool = False) -> Path:
        """Write config JSON + safetensors, atomically (a temp dir renamed into place).

        The backbone is referenced, not copied, unless ``merged=True``: then the LoRA-merged
        backbone and its tokenizer are written under ``backbone/`` and the student no longer
        depends on the original model.
        """
        return save_student(self, directory, merged)
