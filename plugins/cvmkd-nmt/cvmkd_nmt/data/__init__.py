"""Corpus reading, subword tokenisation and length-bucketed batching for cvmkd.

Names are imported on first use, so reading corpora does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batching import (
        Batch,
        BatchStream,
        BucketBatchSampler,
        batches_once,
        make_batch,
    )
    from .readers import (
        Pair,
        PairList,
        filter_pairs,
        read_jsonl,
        read_parallel,
        read_tsv,
        split_pairs,
    )
    from .tokenizer import MODEL_FILENAME, Tokenizer, train_tokenizer
    from .tokens import TokenRows

_WHERE = {
    "Batch": "batching",
    "BatchStream": "batching",
    "BucketBatchSampler": "batching",
    "make_batch": "batching",
    "batches_once": "batching",
    "Pair": "readers",
    "PairList": "readers",
    "filter_pairs": "readers",
    "read_jsonl": "readers",
    "read_parallel": "readers",
    "read_tsv": "readers",
    "split_pairs": "readers",
    "MODEL_FILENAME": "tokenizer",
    "Tokenizer": "tokenizer",
    "train_tokenizer": "tokenizer",
    "TokenRows": "tokens",
}

__all__ = [
    "MODEL_FILENAME",
    "Batch",
    "BatchStream",
    "BucketBatchSampler",
    "Pair",
    "PairList",
    "TokenRows",
    "Tokenizer",
    "batches_once",
    "filter_pairs",
    "make_batch",
    "read_jsonl",
    "read_parallel",
    "read_tsv",
    "split_pairs",
    "train_tokenizer",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
