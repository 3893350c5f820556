"""BERT-style text encoder and fusion (cross-modal) layers of X²-VLM.

One stack of post-LN BERT layers: layers ``[0, fusion_start)`` are the text encoder, layers
``[fusion_start, num_layers)`` add cross-attention to vision tokens after self-attention (the
fusion encoder). The same module, built with ``fusion_start=0`` and no embeddings, is the separate
cross encoder of the XLM-R variant; built with ``causal=True`` it is the VQA answer decoder.

Sub-module names are the Hugging Face BERT names (``embeddings``, ``encoder.layer.N.attention.self.query``
...), which is what the released checkpoints and every BERT/RoBERTa checkpoint on the hub use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from x2vlm.config import TextConfig
from x2vlm.models.layers import (
    CROSS_ATTENTION_MASK_VALUE,
    SELF_ATTENTION_MASK_VALUE,
    Dropout,
    DropPath,
    attention,
    linspace,
    padding_bias,
)


class TextEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout.

    ``position_style='roberta'`` numbers positions from ``pad_token_id + 1`` over non-pad tokens, as
    RoBERTa/XLM-R do; ``'absolute'`` is BERT's 0..L-1.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            padding_idx=cfg.pad_token_id if cfg.position_style == "roberta" else None,
        )
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)

    def position_ids_for(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.position_style == "roberta":
            not_pad = input_ids.ne(self.cfg.pad_token_id).long()
            return torch.cumsum(not_pad, dim=1) * not_pad + self.cfg.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = self.position_ids_for(input_ids)
        if position_ids.max() >= self.cfg.max_position_embeddings:
            raise ValueError(
                f"text of length {input_ids.shape[1]} exceeds max_position_embeddings={self.cfg.max_position_embeddings}"
            )
        token_types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids) + self.token_type_embeddings(token_types)
        return self.dropout(self.LayerNorm(x))


class AttentionProjections(nn.Module):
    """Query from the hidden states; key and value from ``kv_width``-wide inputs (vision for cross-attention)."""

    def __init__(self, hidden: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class ResidualOutput(nn.Module):
    """``LayerNorm(drop_path(dropout(dense(x))) + residual)``: the output of every BERT sub-block."""

    def __init__(self, cfg: TextConfig, in_width: int, drop_path: float):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.drop_path(self.dropout(self.dense(x))) + residual)


class MultiHeadAttention(nn.Module):
    """BERT attention sub-block (``self`` projections + ``output``), post-LN."""

    def __init__(self, cfg: TextConfig, kv_width: int, drop_path: float):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout_p = cfg.attention_dropout
        self.self = AttentionProjections(cfg.hidden_size, kv_width)  # official key: attention.self.query
        self.output = ResidualOutput(cfg, cfg.hidden_size, drop_path)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def project_kv(self, kv_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, N, d) of ``kv_input``, as ``forward`` computes them."""
        return self._heads(self.self.key(kv_input)), self._heads(self.self.value(kv_input))

    def forward(
        self,
        hidden: torch.Tensor,
        kv_input: torch.Tensor | None,
        bias: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``kv``: keys and values from ``project_kv`` computed beforehand (``kv_input`` is then unused).
        ``kv_rows``: row ``b`` of ``hidden`` attends to input ``kv_rows[b]`` (keys/values projected once
        per input, then gathered)."""
        batch, length, width = hidden.shape
        q = self._heads(self.self.query(hidden))
        if kv is None and kv_rows is None and length == 1 < kv_input.shape[1] and not self.training:
            out = self._one_query_attention(q, kv_input, bias)
        else:
            k, v = kv if kv is not None else self.project_kv(kv_input)
            out, _ = attention(q, k, v, bias, dropout_p=self.dropout_p if self.training else 0.0, kv_rows=kv_rows)
        return self.output(out.transpose(1, 2).reshape(batch, length, width), hidden)

    def _one_query_attention(self, q: torch.Tensor, kv_input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``attention(q, *project_kv(kv_input), bias)`` for a single query (B, heads, 1, d), without
        projecting every input position: q.k_j = (q Wk) . x_j + q . bk, and since the probabilities
        sum to one, sum_j p_j v_j = (sum_j p_j x_j) Wv^T + bv. Per head that is O(N * width) instead
        of the O(N * width * hidden) key/value projections (the last fusion layer at CLS only)."""
        heads, d = q.shape[1], q.shape[-1]
        w_k = self.self.key.weight.view(heads, d, -1)  # (heads, d, in)
        w_v = self.self.value.weight.view(heads, d, -1)
        q = q[:, :, 0].transpose(0, 1)  # (heads, B, d)
        scores = torch.bmm(torch.bmm(q, w_k).transpose(0, 1), kv_input.transpose(1, 2))  # (B, heads, N)
        if self.self.key.bias is not None:
            scores = scores + torch.bmm(q, self.self.key.bias.view(heads, d, 1).to(q.dtype)).transpose(0, 1)
        scores = scores * d**-0.5
        if bias is not None:  # (B, 1, 1, N) or (B, 1, 1 query, N)
            scores = scores + bias[:, :, 0].to(scores.dtype)
        mixed = torch.bmm(scores.softmax(dim=-1), kv_input)  # (B, heads, in)
        out = torch.bmm(mixed.transpose(0, 1), w_v.transpose(1, 2).to(mixed.dtype))  # (heads, B, d)
        if self.self.value.bias is not None:
            out = out + self.self.value.bias.view(heads, 1, d).to(out.dtype)
        return out.transpose(0, 1).unsqueeze(2)  # (B, heads, 1, d)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TextLayer(nn.Module):
    """Self-attention, optional cross-attention to vision tokens, feed-forward; each post-LN."""

    def __init__(self, cfg: TextConfig, cross_width: int | None, drop_path: float = 0.0):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, cfg.hidden_size, drop_path)
        self.crossattention = MultiHeadAttention(cfg, cross_width, drop_path) if cross_width else None
        self.intermediate = Intermediate(cfg)
        self.output = ResidualOutput(cfg, cfg.intermediate_size, drop_path)

    def forward(
        self,
        hidden: torch.Tensor,
        self_bias: torch.Tensor | None,
        vision_states: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        first_only: bool = False,
        self_attended: bool = False,
        vision_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # ``history``: this layer's inputs at earlier positions (incremental decoding); keys and
        # values are computed over history + current tokens. ``cross_kv``: this layer's
        # cross-attention keys/values of the vision tokens, precomputed (``vision_states`` unused).
        # ``first_only``: only position 0's output is computed (keys/values still cover every
        # position): all an ITM / classification head reads of the last layer.
        # ``self_attended``: ``hidden`` is already this layer's self-attention output
        # (``self_attend``), e.g. computed once per text for many images. ``vision_rows``: row b
        # cross-attends to ``vision_states[vision_rows[b]]``.
        if not self_attended:
            hidden = self.self_attend(hidden, self_bias, history, first_only)
        elif first_only:
            hidden = hidden[:, :1]
        return self.cross_and_feed_forward(hidden, vision_states, cross_bias, cross_kv, vision_rows)

    def self_attend(self, hidden: torch.Tensor, self_bias: torch.Tensor | None, history: torch.Tensor | None = None,
                    first_only: bool = False) -> torch.Tensor:
        """The self-attention sub-block (it never looks at vision tokens)."""
        kv_input = hidden if history is None else torch.cat([history, hidden], dim=1)
        if first_only:
            hidden = hidden[:, :1]
            if self_bias is not None and self_bias.shape[-2] > 1:  # a (B, 1, Lq, Lk) mask matrix
                self_bias = self_bias[..., :1, :]
        return self.attention(hidden, kv_input, self_bias)

    def cross_and_feed_forward(self, hidden: torch.Tensor, vision_states: torch.Tensor | None, cross_bias: torch.Tensor | None,
                               cross_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                               vision_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention (when the layer has it and vision is given) and the feed-forward sub-block."""
        if self.crossattention is not None and (vision_states is not None or cross_kv is not None):
            hidden = self.crossattention(hidden, vision_states, cross_bias, kv=cross_kv, kv_rows=vision_rows)
        return self.output(self.intermediate(hidden), hidden)


@dataclass
class CrossKV:
    """Cross-attention keys and values of a set of vision inputs, one pair per fusion layer.

    They depend only on the vision tokens, so a retrieval re-ranker computes them once per image and
    reuses them for every text paired with it. ``rows`` picks, for each row of a text batch, the
    vision input it attends to (``None``: row ``b`` uses input ``b``); the attention reads each
    row's keys/values through ``rows`` (``attention(..., kv_rows=...)``), so they are not copied per row.
    """

    keys: list[torch.Tensor]  # per fusion layer: (I, heads, N, d)
    values: list[torch.Tensor]
    rows: torch.Tensor | None = None

    @property
    def num_inputs(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.num_inputs if self.rows is None else len(self.rows)

    def select(self, rows: torch.Tensor) -> CrossKV:
        """The same cache, seen by a batch whose row ``b`` attends to input ``rows[b]``."""
        rows = rows.to(self.keys[0].device)
        return CrossKV(self.keys, self.values, rows if self.rows is None else self.rows[rows])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion layer ``index``'s keys and values, one per input (``rows`` maps text rows to them)."""
        return self.keys[index], self.values[index]


class LayerStack(nn.Module):
    def __init__(self, layers: list[TextLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextTransformer(nn.Module):
    """Embeddings (optional) and a stack of BERT layers, cross-attention from ``cross_start`` on.

    - text + fusion stack (X²-VLM): ``num_layers=18, cross_start=12``;
    - separate cross encoder: ``with_embeddings=False, cross_start=0``;
    - VQA answer decoder: ``causal=True, cross_start=0``, cross width = text width.
    """

    def __init__(
        self,
        cfg: TextConfig,
        num_layers: int,
        cross_start: int,
        cross_width: int,
        with_embeddings: bool = True,
        causal: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.cross_start = cross_start
        self.embeddings = TextEmbeddings(cfg) if with_embeddings else None
        text_rates = linspace(cfg.text_drop_path_rate, max(cross_start, 1))
        cross_rates = linspace(cfg.cross_drop_path_rate, max(num_layers - cross_start, 1))
        layers = []
        for i in range(num_layers):
            has_cross = i >= cross_start
            rate = cross_rates[i - cross_start] if has_cross else text_rates[i]
            layers.append(TextLayer(cfg, cross_width if has_cross else None, rate))
        self.encoder = LayerStack(layers)
        self.grad_checkpointing = False  # X2VLM.set_grad_checkpointing

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    def self_attention_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """Additive self-attention bias from a (B, L) padding mask or a (B, L, L_total) mask."""
        if mask.dim() == 2 and self.causal:
            length = mask.shape[1]
            causal = torch.tril(torch.ones(length, length, device=mask.device, dtype=mask.dtype))
            mask = causal[None] * mask[:, None, :]
        return padding_bias(mask, SELF_ATTENTION_MASK_VALUE)

    def run_layers(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        start: int,
        end: int,
        vision_states: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        history: list[torch.Tensor] | None = None,
        cross_kv: CrossKV | None = None,
        first_only: bool = False,
        self_attended: bool = False,
        vision_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Layers ``[start, end)``: the last states, and (if asked, or with ``history``) the input of
        the first layer followed by every layer's output; otherwise an empty list.

        ``first_only``: the last layer computes position 0 only, so the last states are (B, 1, H)
        (the same values as ``[:, :1]`` of the full result; for heads that read the CLS state).
        ``self_attended``: ``hidden`` is the output of layer ``start``'s self-attention sub-block
        (``self_attention``), which is then skipped.

        With ``history`` (one tensor per layer in the range: the cached inputs of earlier positions),
        ``mask`` must be the (B, L_current, L_history + L_current) 0/1 matrix. With ``cross_kv``
        (from ``cross_kv`` over the same range) the cross-attention uses those keys/values instead of
        projecting ``vision_states``; ``vision_mask`` (one row per text row) still applies.
        ``vision_rows`` (one index per text row): row ``b`` cross-attends to ``vision_states[vision_rows[b]]``,
        each layer projecting every vision input's keys/values once (training ITM: three rows per image).
        """
        if cross_kv is not None and vision_states is not None:
            raise ValueError("run_layers: give vision_states or cross_kv, not both")
        if cross_kv is not None:
            if vision_rows is not None:
                raise ValueError("run_layers: give vision_rows or a selected cross_kv, not both")
            vision_rows = cross_kv.rows
        self_bias = self.self_attention_bias(mask)
        cross_bias = None
        if vision_states is not None or cross_kv is not None:
            if vision_mask is None:
                shape = (cross_kv.batch_size, cross_kv.num_tokens) if cross_kv is not None else (
                    (len(vision_rows), vision_states.shape[1]) if vision_rows is not None else vision_states.shape[:2])
                vision_mask = torch.ones(shape, dtype=torch.long, device=hidden.device)
            cross_bias = padding_bias(vision_mask, CROSS_ATTENTION_MASK_VALUE)
        keep = output_hidden_states or history is not None
        if keep and (first_only or self_attended):
            raise ValueError("run_layers: first_only / self_attended give no per-layer states")
        states = [hidden] if keep else []
        cross_index = 0
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and history is None
        for offset, layer in enumerate(self.encoder.layer[start:end]):
            past = history[offset] if history is not None else None
            layer_kv = None
            if cross_kv is not None and layer.crossattention is not None:
                layer_kv = cross_kv.layer(cross_index)
                cross_index += 1
            flags = dict(first_only=first_only and start + offset == end - 1, self_attended=self_attended and offset == 0,
                         vision_rows=vision_rows)
            if recompute:  # keep only the layer's inputs; its activations are recomputed in backward
                hidden = checkpoint(layer, hidden, self_bias, vision_states, cross_bias, past, layer_kv, use_reentrant=False, **flags)
            else:
                hidden = layer(hidden, self_bias, vision_states, cross_bias, past, layer_kv, **flags)
            if keep:
                states.append(hidden)
        return hidden, states

    def self_attention(self, hidden: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer ``layer``'s self-attention sub-block alone (for ``run_layers(..., self_attended=True)``)."""
        return self.encoder.layer[layer].self_attend(hidden, self.self_attention_bias(mask))

    def cross_kv(self, vision_states: torch.Tensor, start: int, end: int) -> CrossKV:
        """The cross-attention keys/values of ``vision_states`` for the layers ``[start, end)``."""
        keys, values = [], []
        for layer in self.encoder.layer[start:end]:
            if layer.crossattention is not None:
                key, value = layer.crossattention.project_kv(vision_states)
                keys.append(key)
                values.append(value)
        if not keys:
            raise ValueError(f"layers [{start}, {end}) have no cross-attention")
        return CrossKV(keys, values)

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        vision_states: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embeddings and every layer (cross-attention skipped when ``vision_states`` is None)."""
        hidden = self.embeddings(input_ids, position_ids)
        return self.run_layers(hidden, mask, 0, self.num_layers, vision_states, vision_mask, output_hidden_states)


class PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """BERT prediction head: dense, GELU, LayerNorm, then the word-embedding matrix plus ``bias``.

    The decoder weight is tied to the word embeddings (as in every released checkpoint), so it is
    passed in rather than stored twice.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)
