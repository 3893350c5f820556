"""The untied MLM head of the separate-cross-encoder (XVLMPlus / CCLM) models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from x2vlm.config import TextConfig
from x2vlm.models.bert import MLMHead


class UntiedMLMHead(MLMHead):
    """``MLMHead`` with its own decoder matrix (``decoder.weight``, (V, H), no bias of its own: the
    vocabulary bias stays ``bias``), as the official ``XVLMPlusBase.mlm_head = BertOnlyMLMHead(...)``,
    which is not tied to the word embeddings. The word embeddings callers pass are ignored."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(self.transform(hidden), self.decoder.weight, self.bias)
