"""BEiT-2 vision transformer as used by X²-VLM.

The official model keeps the BEiT-2 trunk (per-block relative position bias, layer scale, separate
q/v biases, no absolute position embedding unless configured) but changes the output: the CLS output is dropped,
every patch token goes through ``fc_norm`` and token 0 of the result is the mean of the normalised
patch tokens. Region features replace token 0 by the mean of the patches a box covers.

Parameter names follow the released checkpoints (``vision_encoder.*``), so official weights load
without renaming; only the ``relative_position_index`` buffers are regenerated for the model's grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.interpolate import RectBivariateSpline
from torch import nn
from torch.utils.checkpoint import checkpoint

from x2vlm.config import VisionConfig
from x2vlm.models.layers import DropPath, attention, linspace, take_rows


def relative_position_index(grid: int) -> torch.Tensor:
    """Index into a BEiT relative-position table for a ``grid x grid`` patch layout plus CLS.

    Patch pair (i, j) maps to ``(dy + g-1) * (2g-1) + (dx + g-1)``; the three extra rows at the
    end of the table hold CLS->patch (R-3), patch->CLS (R-2) and CLS->CLS (R-1).
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, N)
    delta = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
    patch_index = (delta[0] + grid - 1) * (2 * grid - 1) + (delta[1] + grid - 1)
    num_rows = (2 * grid - 1) ** 2 + 3
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, :] = num_rows - 3
    index[:, 0] = num_rows - 2
    index[0, 0] = num_rows - 1
    return index


def _geometric_ratio(src_half: int, dst_half: int) -> float:
    """Bisection of the official resize: ratio q with 1 + q + ... + q^(src_half-1) ≈ dst_half."""
    left, right = 1.01, 1.5
    ratio = left
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        series = (1.0 - ratio**src_half) / (1.0 - ratio)
        if series > dst_half:
            right = ratio
        else:
            left = ratio
    return ratio


def resize_relative_position_bias_table(table: torch.Tensor, dst_grid: int, num_extra: int = 3) -> torch.Tensor:
    """Resize a ``((2g-1)^2 + 3, heads)`` table to another grid exactly as the official loader does.

    Source offsets sit on a geometric progression, targets on the integers, and every head is
    interpolated with an exact bicubic spline (the official code used SciPy's removed ``interp2d``;
    ``RectBivariateSpline`` on the transposed grid reproduces it).
    """
    src_rows, heads = table.shape
    src_size = math.isqrt(src_rows - num_extra)
    dst_size = 2 * dst_grid - 1
    if src_size * src_size != src_rows - num_extra:
        raise ValueError(f"relative position table with {src_rows} rows is not a square grid plus {num_extra}")
    if src_size == dst_size:
        return table.clone()
    extra = table[-num_extra:]
    ratio = _geometric_ratio(src_size // 2, dst_size // 2)
    offsets, step = [], 1.0
    for i in range(src_size // 2):
        offsets.append(step)
        step += ratio ** (i + 1)
    src_axis = np.array([-d for d in reversed(offsets)] + [0.0] + offsets)
    half = dst_size // 2
    dst_axis = np.arange(-half, half + 0.1, 1.0)
    grids = table[:-num_extra].detach().float().cpu().numpy()
    resized = []
    for h in range(heads):
        z = grids[:, h].reshape(src_size, src_size)
        spline = RectBivariateSpline(src_axis, src_axis, z.T, kx=3, ky=3, s=0)
        resized.append(torch.from_numpy(spline(dst_axis, dst_axis).T.astype(np.float32)).reshape(-1))
    body = torch.stack(resized, dim=1).to(table.dtype)
    return torch.cat([body, extra.to(body)], dim=0)


def sincos_position_table(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) 2-D sine-cosine positions, row-major like the patches: the first half of the
    channels encodes the column, the second half the row, each as sin/cos at ``width // 4``
    frequencies from 1 down to 1/10000 (MAE's table)."""
    if width % 4:
        raise ValueError(f"a sincos position table needs a width divisible by 4, got {width}")
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def resize_abs_pos_embed(pos_embed: torch.Tensor, dst_grid: int) -> torch.Tensor:
    """Bicubic resize of a ``(1, 1 + g*g, D)`` absolute position embedding to ``dst_grid``; CLS kept."""
    src_grid = math.isqrt(pos_embed.shape[1] - 1)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or src_grid * src_grid + 1 != pos_embed.shape[1]:
        raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} is not (1, 1 + g*g, D)")
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, src_grid, src_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst_grid, dst_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst_grid * dst_grid, -1).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, grid: int):
        super().__init__()
        self.num_heads = num_heads
        # The released checkpoints store the q and v biases apart from the bias-free qkv matrix.
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def position_bias(self) -> torch.Tensor:
        tokens = self.relative_position_index.shape[0]
        bias = take_rows(self.relative_position_bias_table, self.relative_position_index.view(-1))
        return bias.view(tokens, tokens, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        batch, tokens, width = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out, probs = attention(q, k, v, self.position_bias().unsqueeze(0), return_probs=return_probs)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, width))
        return out, probs


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block with layer scale: x + γ1·attn(norm1(x)), then x + γ2·mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, grid: int, drop_path: float):
        super().__init__()
        # Registration order reproduces the official state-dict order.
        self.gamma_1 = nn.Parameter(torch.full((cfg.width,), cfg.layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((cfg.width,), cfg.layer_scale_init))
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads, grid)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, cfg.width * cfg.mlp_ratio)

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        attn_out, probs = self.attn(self.norm1(x), return_probs=return_probs)
        x = x + self.drop_path(self.gamma_1 * attn_out)
        x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x, probs


class VisionTransformer(nn.Module):
    """BEiT-2 trunk returning ``[mean patch token, fc_norm(patch tokens)]`` of shape (B, 1+N, D)."""

    def __init__(self, cfg: VisionConfig, image_res: int):
        super().__init__()
        if image_res % cfg.patch_size:
            raise ValueError(f"image_res {image_res} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.grid = image_res // cfg.patch_size
        self.num_patches = self.grid * self.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, cfg.width)) if cfg.abs_pos_embed else None
        rates = linspace(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(Block(cfg, self.grid, rate) for rate in rates)
        self.fc_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.grad_checkpointing = False  # X2VLM.set_grad_checkpointing
        self.init_weights()

    def init_weights(self) -> None:
        """BEiT initialisation (only matters without a checkpoint)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            if self.cfg.pos_embed_init == "sincos":
                with torch.no_grad():
                    self.pos_embed[0, 1:] = sincos_position_table(self.grid, self.cfg.width)
                    self.pos_embed[0, 0] = 0.0
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer))

    def trunk(self, images: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False):
        """All blocks over [CLS; patches]; returns the final tokens and optional per-block records."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        hidden_states, attentions = [], []
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and not output_attentions
        for block in self.blocks:
            if output_hidden_states:
                hidden_states.append(x)
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x, probs = checkpoint(block, x, use_reentrant=False)
                continue
            x, probs = block(x, return_probs=output_attentions)
            if output_attentions:
                attentions.append(probs)
        return x, hidden_states, attentions

    def forward(self, images: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False):
        x, hidden_states, attentions = self.trunk(images, output_hidden_states, output_attentions)
        patches = self.fc_norm(x[:, 1:])
        embeds = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)
        if output_hidden_states or output_attentions:
            return embeds, hidden_states + [embeds], attentions
        return embeds

    def region_forward(self, images: torch.Tensor, image_index: torch.Tensor, region_mask: torch.Tensor):
        """Region embeddings for boxes pointing at ``images``.

        ``image_index`` (R,) names each region's image; ``region_mask`` (R, 1+N) is 1 on the patches
        the box covers (position 0 is the pooled token). Returns ``(region_embeds, image_embeds)``:
        token 0 of a region is the mean of its covered patch tokens; image_embeds are the ordinary
        full-image embeddings (B_img, 1+N, D).
        """
        image_embeds = self.forward(images)
        patches = take_rows(image_embeds, image_index)[:, 1:]
        weights = region_mask[:, 1:].to(patches.dtype).unsqueeze(-1)
        region_token = (patches * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
        return torch.cat([region_token, patches], dim=1), image_embeds
