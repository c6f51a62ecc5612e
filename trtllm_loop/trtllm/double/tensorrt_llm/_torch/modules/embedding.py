"""Mimics ``tensorrt_llm/_torch/modules/embedding.py``: ``LMHead`` (a Linear whose vocab rows split COLUMN-wise,
padded to a multiple of tp, gathered) and ``Embedding`` (vocab-split lookup: out-of-shard ids give zeros, then
an all-reduce sums the shards)."""
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from tensorrt_llm.mapping import Mapping

from .linear import Linear, TensorParallelMode, load_weight_shard


class LMHead(Linear):

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = None,
                 mapping: Optional[Mapping] = None, tensor_parallel_mode: Optional[TensorParallelMode] = None,
                 gather_output: bool = False):
        mapping = mapping or Mapping()
        tp = mapping.tp_size
        if tensor_parallel_mode == TensorParallelMode.ROW:
            raise NotImplementedError("the double implements vocab (COLUMN) parallel embeddings only")
        local_out = math.ceil(num_embeddings / tp) if tensor_parallel_mode == TensorParallelMode.COLUMN \
            else num_embeddings
        self.padding_size = local_out * tp - num_embeddings if tensor_parallel_mode == TensorParallelMode.COLUMN \
            else 0
        super().__init__(embedding_dim, local_out * (tp if tensor_parallel_mode else 1), bias=False, dtype=dtype,
                         mapping=mapping, tensor_parallel_mode=tensor_parallel_mode, gather_output=gather_output)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @property
    def vocab_size_padded(self) -> int:
        return self.out_features * self.tp_size if self.tp_mode == TensorParallelMode.COLUMN and \
            self.gather_output else self.out_features

    def load_weights(self, weights: List[Dict]):
        w = weights[0]["weight"]
        if self.padding_size:
            w = F.pad(w, (0, 0, 0, self.padding_size))
        self.weight.data.copy_(load_weight_shard(w, self.tp_size, self.tp_rank, self.tp_mode).to(self.weight.dtype))

    def forward(self, input, *, all_reduce_params=None):
        out = super().forward(input, all_reduce_params=all_reduce_params)
        if self.tp_mode == TensorParallelMode.COLUMN and self.gather_output and self.padding_size > 0:
            out = out[..., :-self.padding_size]
        return out


class Embedding(LMHead):

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Optional[torch.dtype] = None,
                 mapping: Optional[Mapping] = None, tensor_parallel_mode: Optional[TensorParallelMode] = None,
                 gather_output: bool = False):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, mapping=mapping,
                         tensor_parallel_mode=tensor_parallel_mode, gather_output=gather_output)
        from tensorrt_llm._torch.distributed import AllReduce
        self.vocab_start_index = self.tp_rank * self.out_features if self.tp_size > 1 else 0
        self.vocab_end_index = min(self.vocab_start_index + self.out_features, num_embeddings)
        self.embed_all_reduce = AllReduce(self.mapping)

    def forward(self, input):
        if self.tp_size == 1 or self.tp_mode is None:
            return F.embedding(input, self.weight)
        inside = (input >= self.vocab_start_index) & (input < self.vocab_end_index)
        out = F.embedding((input - self.vocab_start_index) * inside, self.weight)
        out = out.masked_fill(~inside.unsqueeze(-1), 0)
        return self.embed_all_reduce(out)
