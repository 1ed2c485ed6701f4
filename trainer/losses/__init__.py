"""D2LLM distillation losses, one module each (formula in each module's docstring)."""

from llama_index_d2llm.trainer.losses.contrastive_imitation import contrastive_imitation_loss
from llama_index_d2llm.trainer.losses.distillation import D2LLMDistillationLoss, LossWeights
from llama_index_d2llm.trainer.losses.feature_imitation import cosine_matrix, feature_imitation_loss
from llama_index_d2llm.trainer.losses.in_batch import in_batch_loss
from llama_index_d2llm.trainer.losses.pairwise_rank import pairwise_rank_loss
from llama_index_d2llm.trainer.losses.rank_imitation import pearson_correlation, rank_imitation_loss
from llama_index_d2llm.trainer.losses.vector_contrastive import vector_contrastive_loss

__all__ = [
    "D2LLMDistillationLoss",
    "LossWeights",
    "contrastive_imitation_loss",
    "cosine_matrix",
    "feature_imitation_loss",
    "in_batch_loss",
    "pairwise_rank_loss",
    "pearson_correlation",
    "rank_imitation_loss",
    "vector_contrastive_loss",
]
