"""Tiny, randomly initialised causal LMs and tokenizers built offline for the tests.

A byte-level BPE tokenizer is trained on a few sentences (so any text tokenizes, and
"yes"/"no" are single tokens), and a 2-layer Llama or Gemma 3 model is built from a config.
"""

from __future__ import annotations

import os
from pathlib import Path

WORDS = (
    "the cat sat on the mat . a dog runs in the park . yes no Yes No answer query passage "
    "question document science protein cell gene cancer water energy climate city river "
    "history music computer network model data learning quantum physics chemistry sun moon"
)


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([WORDS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_causal_lm(directory: str | Path, arch: str = "llama", hidden_size: int = 32,
                         seed: int = 0) -> Path:
    """Save a tiny random causal LM + tokenizer into ``directory`` and return it."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        config = LlamaConfig(**common)
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(**common, head_dim=hidden_size // 4, sliding_window=16)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def build_bert_tokenizer(directory: Path, model_max_length: int = 512):
    """A WordPiece tokenizer (BertTokenizerFast) on a small vocabulary: [CLS] text [SEP]."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,:;!?'-()")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS.lower().split()),
             *letters, *(f"##{c}" for c in letters)]
    ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tokenizer = BertTokenizerFast(vocab=ids, do_lower_case=True,
                                  model_max_length=model_max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_encoder(directory: str | Path, arch: str = "bert", hidden_size: int = 32,
                       max_positions: int = 64, seed: int = 0) -> Path:
    """Save a tiny random BERT-family encoder (no LM head) + WordPiece tokenizer.

    ``max_positions`` is small on purpose: an over-long text must be cut to it, not crash
    the position embeddings.
    """
    import torch
    from transformers import AutoModel

    directory = Path(directory)
    tokenizer = build_bert_tokenizer(directory)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "bert":
        from transformers import BertConfig

        config = BertConfig(**common, hidden_size=hidden_size, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=2 * hidden_size)
    elif arch == "distilbert":
        from transformers import DistilBertConfig

        config = DistilBertConfig(**common, dim=hidden_size, n_layers=3, n_heads=4,
                                  hidden_dim=2 * hidden_size)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


#: What ``build_looping_lm``'s model writes over and over.
LOOPING_LINE = "a dog runs in the park .\n"


def build_looping_lm(directory: str | Path, line: str = LOOPING_LINE) -> Path:
    """A tiny Llama that writes ``line`` over and over, whatever the prompt.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding; the embeddings of the line's tokens are basis vectors and the output layer maps
    each to the next token of the line: a bigram model stuck in one cycle.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = build_tiny_causal_lm(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    cycle = tokenizer(line, add_special_tokens=False)["input_ids"]
    assert len(set(cycle)) == len(cycle) <= model.config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        model.lm_head.weight.zero_()
        for i, token in enumerate(cycle):
            model.model.embed_tokens.weight[token].zero_()
            model.model.embed_tokens.weight[token, i] = 1.0
            model.lm_head.weight[cycle[(i + 1) % len(cycle)], i] = 10.0
    model.save_pretrained(directory)
    return directory


def device_for_tests():
    """The device tests put models on: D2LLM_TEST_DEVICE (e.g. ``cuda`` on a GPU machine),
    else the CPU, so a run here never depends on what hardware happens to be present."""
    import torch

    name = os.environ.get("D2LLM_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"D2LLM_TEST_DEVICE={name} but torch sees no CUDA device")
    return torch.device(name)
