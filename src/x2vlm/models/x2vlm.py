"""The X²-VLM model: BEiT-2 vision, BERT text + fusion, and the heads of every task.

One class covers all official model classes; ``config.task`` decides which heads exist
(``x2vlm.config.TASK_HEADS``). Images, regions and videos all become ``(B, 1+N, D)`` vision
embeddings with a 0/1 mask, so the rest of the model treats them alike.

Native parameter names equal the official fine-tuning layout (``text_encoder.embeddings.*``,
``text_encoder.encoder.layer.N.*``, ``itm_head.0`` ...). The MLM head lives at ``mlm_head`` and the
VQA decoder at ``answer_decoder``/``answer_head``; ``x2vlm.checkpoint`` maps the released layouts
(``text_encoder.bert.*``, ``text_encoder.cls.predictions.*``, ``text_decoder.*``) onto these names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from x2vlm.config import X2VLMConfig
from x2vlm.models.beit import VisionTransformer
from x2vlm.models.bert import CrossKV, MLMHead, TextTransformer
from x2vlm.models.layers import build_mlp, take_rows

TOWERS = ("vision", "text")  # what ``X2VLM.freeze`` can freeze


def check_towers(towers, where: str) -> None:
    """A run config's ``freeze`` list: an unknown tower is an error naming the config."""
    unknown = [t for t in towers if t not in TOWERS]
    if unknown:
        raise ValueError(f"{where}: freeze: unknown tower(s) {unknown}; towers: {', '.join(TOWERS)}")


class X2VLM(nn.Module):
    def __init__(self, cfg: X2VLMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        heads = cfg.heads
        t = cfg.text
        if cfg.add_frame_pos:
            if cfg.frame_len <= 0:
                raise ValueError("config: add_frame_pos needs frame_len > 0")
            self.absolute_frame_pos_embed = nn.Parameter(torch.zeros(1, cfg.frame_len, 1, cfg.vision.width))
            nn.init.trunc_normal_(self.absolute_frame_pos_embed, std=0.02)
        if "itc" in heads:
            self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self.vision_encoder = VisionTransformer(cfg.vision, cfg.image_res)
        self.text_encoder = TextTransformer(t, t.num_layers, cross_start=t.fusion_start, cross_width=cfg.vision.width)
        if "mlm" in heads:  # the official MLM head sits inside the text encoder (text_encoder.cls)
            if cfg.untied_mlm_decoder:  # XVLMPlus / CCLM: its own decoder matrix
                from x2vlm.models.heads import UntiedMLMHead

                self.mlm_head = UntiedMLMHead(t)
            else:
                self.mlm_head = MLMHead(t)
        self.cross_encoder = None
        if cfg.cross_num_layers:
            self.cross_encoder = TextTransformer(  # its own LayerNorm eps / dropout: cfg.cross (BERT's), else the text's
                cfg.cross_text, cfg.cross_num_layers, cross_start=0, cross_width=cfg.vision.width, with_embeddings=False
            )
        width = t.hidden_size
        if "itc" in heads:
            self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
            self.text_proj = nn.Linear(width, cfg.embed_dim)
        if "itm" in heads:
            self.itm_head = build_mlp(width, 2)
        if "bbox" in heads:
            self.bbox_head = build_mlp(width, 4)
        if "nlvr" in heads:
            self.cls_head = build_mlp(2 * width, 2)
        if "classify" in heads:
            self.cls_head = build_mlp(width, cfg.num_labels)
        if "answer_decoder" in heads:
            self.answer_decoder = TextTransformer(t, cfg.num_dec_layers, cross_start=0, cross_width=width, causal=True)
            self.answer_head = MLMHead(t)
        self._init_text_weights()
        self.frozen: tuple[str, ...] = ()
        self._memo: dict[bytes, torch.Tensor] | None = None

    def _init_text_weights(self) -> None:
        """BERT initialisation for everything outside the vision tower (N(0, 0.02), zero bias, LN 1/0)."""
        for name, module in self.named_modules():
            if name.startswith("vision_encoder"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every vision block and text / fusion / cross / decoder layer
        (each keeps only its inputs in the forward pass and recomputes the rest during backward):
        less activation memory for about a third more compute. Same values and gradients."""
        for module in self.modules():
            if isinstance(module, (VisionTransformer, TextTransformer)):
                module.grad_checkpointing = enable

    # -- frozen towers ------------------------------------------------------------------------
    def tower_modules(self, tower: str) -> list[nn.Module]:
        """The modules of a tower: "vision" (the image encoder) or "text" (embeddings and the text
        layers before fusion; the whole text encoder where the fusion is a separate cross encoder)."""
        if tower == "vision":
            return [self.vision_encoder]
        if tower == "text":
            if self.cross_encoder is not None:
                return [self.text_encoder]
            return [self.text_encoder.embeddings, *self.text_encoder.encoder.layer[: self.num_text_layers]]
        raise ValueError(f"unknown tower {tower!r}; towers: {', '.join(TOWERS)}")

    def freeze(self, towers: Iterable[str], memoize: bool = False) -> None:
        """Stop training ``towers`` ("vision", "text"): no gradients, and dropout off for good
        (``train()`` leaves them in eval mode). A frozen tower gives the same output for the same
        input, so with ``memoize`` its outputs are kept per input (keyed by content; a text by its
        unpadded tokens): an image or text seen again costs no forward pass. Fine-tuning the fusion
        on frozen towers then costs little more than the fusion itself, at the price of memory for
        every distinct input seen (e.g. (1+N) x D floats per image)."""
        towers = tuple(dict.fromkeys(towers))
        for tower in towers:
            for module in self.tower_modules(tower):
                module.requires_grad_(False)
                module.eval()
        self.frozen = towers
        self._memo = {} if memoize and towers else None

    def train(self, mode: bool = True) -> X2VLM:
        super().train(mode)
        for tower in getattr(self, "frozen", ()):
            for module in self.tower_modules(tower):
                module.eval()
        return self

    def _memoized(self, tower: str, rows: list[torch.Tensor], compute: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        """``compute`` of a frozen tower on per-row inputs, each distinct row computed once ever."""
        memo = self._memo
        keys = [tower.encode() + _content_key(row) for row in rows]
        missing = list(dict.fromkeys(k for k in keys if k not in memo))
        if missing:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            with torch.no_grad():
                outputs = compute([first[k] for k in missing])
            for key, output in zip(missing, outputs):
                memo[key] = output
        return [memo[k] for k in keys]

    @property
    def memoized_inputs(self) -> int:
        """How many distinct tower inputs the memo holds (0 without ``freeze(..., memoize=True)``)."""
        return len(self._memo or ())

    def _vision_tower(self, images: torch.Tensor) -> torch.Tensor:
        if self._memo is None or "vision" not in self.frozen:
            return self.vision_encoder(images)
        rows = self._memoized("vision", list(images), lambda index: self.vision_encoder(images[index]))
        return torch.stack(rows)

    # -- vision --------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> embeddings (B, 1+N, D) and an all-ones mask."""
        embeds = self._vision_tower(images)
        return embeds, _ones_mask(embeds)

    def encode_frames(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, F, 3, H, W) -> per-frame embeddings (B, F, 1+N, D), frame position added."""
        batch, frames = videos.shape[:2]
        embeds = self._vision_tower(videos.flatten(0, 1))
        embeds = embeds.view(batch, frames, *embeds.shape[1:])
        if self.cfg.add_frame_pos:
            if frames > self.cfg.frame_len:
                raise ValueError(f"video has {frames} frames but the model has {self.cfg.frame_len} frame positions")
            embeds = embeds + self.absolute_frame_pos_embed[:, :frames].to(embeds.dtype)
        return embeds

    def encode_videos(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames through the image encoder, then the mean over time: a video looks like an image."""
        embeds = self.encode_frames(videos).mean(dim=1)
        return embeds, _ones_mask(embeds)

    def encode_vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (4-D) or videos (5-D)."""
        if pixels.dim() == 5:
            return self.encode_videos(pixels)
        if pixels.dim() == 4:
            return self.encode_images(pixels)
        raise ValueError(f"expected images (B,3,H,W) or videos (B,F,3,H,W), got shape {tuple(pixels.shape)}")

    def encode_regions(
        self, images: torch.Tensor, image_index: torch.Tensor, region_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Region embeddings ``[box mean, patches]`` (R, 1+N, D), their mask (the box mask, used as the
        cross-attention mask) and the full-image embeddings gathered per region (for box prediction)."""
        region_embeds, image_embeds = self.vision_encoder.region_forward(images, image_index, region_mask)
        return region_embeds, region_mask, take_rows(image_embeds, image_index)

    # -- text and fusion -----------------------------------------------------------------------
    @property
    def num_text_layers(self) -> int:
        return self.cfg.text.fusion_start

    def encode_text(self, input_ids: torch.Tensor, mask: torch.Tensor, output_hidden_states: bool = False):
        """Text layers only (no vision). Returns states, or (states, per-layer states) if asked.

        A memoized frozen text tower returns zeros at padding positions (every later layer masks them)."""
        if self._memo is not None and "text" in self.frozen and not output_hidden_states and mask.dim() == 2:
            return self._memoized_text(input_ids, mask)
        enc = self.text_encoder
        states, per_layer = enc.run_layers(enc.embeddings(input_ids), mask, 0, self.num_text_layers, output_hidden_states=output_hidden_states)
        return (states, per_layer) if output_hidden_states else states

    def _memoized_text(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        counts = mask.sum(dim=1, keepdim=True)
        if not bool((mask == (torch.arange(mask.shape[1], device=mask.device) < counts)).all()):
            raise ValueError("memoized text tower: masks must be right-padded (ones, then zeros)")
        lengths = counts.flatten().tolist()
        rows = [ids[:n] for ids, n in zip(input_ids, lengths)]

        def compute(index: list[int]) -> list[torch.Tensor]:
            enc = self.text_encoder
            states, _ = enc.run_layers(enc.embeddings(input_ids[index]), mask[index], 0, self.num_text_layers)
            return [row[: lengths[i]] for row, i in zip(states, index)]

        states = self._memoized("text", rows, compute)
        out = states[0].new_zeros(len(states), input_ids.shape[1], states[0].shape[-1])
        for i, row in enumerate(states):
            out[i, : row.shape[0]] = row
        return out

    def _fusion_layers(self) -> tuple[TextTransformer, int, int]:
        if self.cross_encoder is not None:
            return self.cross_encoder, 0, self.cross_encoder.num_layers
        return self.text_encoder, self.num_text_layers, self.text_encoder.num_layers

    def fuse(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor,
        vision_embeds: torch.Tensor | None,
        vision_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        cross_kv: CrossKV | None = None,
        cls_only: bool = False,
        self_attended: bool = False,
        vision_rows: torch.Tensor | None = None,
    ):
        """Fusion layers: text states cross-attend to vision tokens (restricted by ``vision_mask``).

        ``cross_kv`` (from ``cross_attention_kv``, usually ``.select``-ed per text row) replaces
        ``vision_embeds``: the same result without projecting the vision tokens again. Without
        either, cross-attention is skipped (text-only MLM).

        Re-ranking shortcuts (the same values, less work): ``cls_only`` computes only the CLS state
        of the last layer (returns (B, 1, H)); ``self_attended``: ``text_states`` come from
        ``fusion_self_attention`` (the first fusion layer's self-attention does not depend on the
        image, so it can be computed once per text). ``vision_rows``: text row ``b`` attends to
        ``vision_embeds[vision_rows[b]]`` (each input's keys/values projected once per layer; training
        ITM, where every image meets three texts)."""
        if vision_embeds is not None and cross_kv is not None:
            raise ValueError("fuse: give vision_embeds or cross_kv, not both")
        enc, start, end = self._fusion_layers()
        states, per_layer = enc.run_layers(
            text_states, text_mask, start, end, vision_embeds, vision_mask, output_hidden_states=output_hidden_states,
            cross_kv=cross_kv, first_only=cls_only, self_attended=self_attended, vision_rows=vision_rows,
        )
        return (states, per_layer) if output_hidden_states else states

    def fusion_self_attention(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The first fusion layer's self-attention sub-block, which sees no vision: its output,
        passed to ``fuse(..., self_attended=True)``, serves every image paired with the text."""
        enc, start, _ = self._fusion_layers()
        return enc.self_attention(text_states, text_mask, start)

    def cross_attention_kv(self, vision_embeds: torch.Tensor) -> CrossKV:
        """Every fusion layer's cross-attention keys/values of ``vision_embeds`` (B, 1+N, D), to be
        reused by ``fuse(..., cross_kv=...)`` for many texts per image (retrieval re-ranking)."""
        enc, start, end = self._fusion_layers()
        return enc.cross_kv(vision_embeds, start, end)

    def encode_multimodal(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        vision_embeds: torch.Tensor | None,
        vision_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text and fusion layers from ids in one pass (``mask`` may be a (B, L, L) matrix).

        Without vision the fusion layers skip cross-attention (text-only MLM)."""
        if self.cross_encoder is not None:
            text_states, _ = self.text_encoder(input_ids, mask, position_ids=position_ids)
            return self.fuse(text_states, mask, vision_embeds, vision_mask)
        states, _ = self.text_encoder(input_ids, mask, vision_embeds, vision_mask, position_ids=position_ids)
        return states

    # -- heads ---------------------------------------------------------------------------------
    def vision_features(self, vision_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive feature of token 0 (image mean, region box mean, video mean)."""
        return F.normalize(self.vision_proj(vision_embeds[:, 0]), dim=-1)

    def text_features(self, text_states: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive feature of the text CLS after the text layers."""
        return F.normalize(self.text_proj(text_states[:, 0]), dim=-1)

    def itm_logits(self, fused_states: torch.Tensor) -> torch.Tensor:
        """(B, 2) match logits; column 1 is the retrieval re-ranking score."""
        return self.itm_head(fused_states[:, 0])

    def predict_boxes(self, image_embeds: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Normalised (cx, cy, w, h) of the region the text describes, from the full image."""
        fused = self.fuse(text_states, text_mask, image_embeds, _ones_mask(image_embeds))
        return self.bbox_head(fused[:, 0]).sigmoid()

    def mlm_logits(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        vision_embeds: torch.Tensor | None,
        vision_mask: torch.Tensor | None,
        masked_pos: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Vocabulary logits (B, M, V) at ``masked_pos`` (B, M) after all text and fusion layers."""
        states = self.encode_multimodal(input_ids, mask, vision_embeds, vision_mask, position_ids)
        picked = states.gather(1, masked_pos.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
        return self.mlm_head(picked, self.text_encoder.embeddings.word_embeddings.weight)

    def classify(self, fused_cls: torch.Tensor) -> torch.Tensor:
        """Classification logits from a fused CLS vector (NLVR2: two of them concatenated)."""
        return self.cls_head(fused_cls)

    def nlvr_features(self, left_images: torch.Tensor, right_images: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """NLVR2's classifier input (B, 2H): both images encoded in one batch, the statement's text
        layers run once and fused with each image, the two fused CLS vectors concatenated."""
        embeds, vmask = self.encode_images(torch.cat([left_images, right_images]))
        left, right = embeds.chunk(2)
        left_mask, right_mask = vmask.chunk(2)
        text = self.encode_text(input_ids, mask)
        fused_left = self.fuse(text, mask, left, left_mask)
        fused_right = self.fuse(text, mask, right, right_mask)
        return torch.cat([fused_left[:, 0], fused_right[:, 0]], dim=-1)

    def nlvr_logits(self, left_images: torch.Tensor, right_images: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """NLVR2: the CLS pair of ``nlvr_features`` -> 2 logits."""
        return self.classify(self.nlvr_features(left_images, right_images, input_ids, mask))

    # -- VQA answer decoder ----------------------------------------------------------------------
    def answer_logits(
        self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, question_states: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        """Causal decoder over answers cross-attending to the question states: (B, L, V) next-token logits."""
        states, _ = self.answer_decoder(answer_ids, answer_mask, question_states, question_mask)
        return self.answer_head(states, self.answer_decoder.embeddings.word_embeddings.weight)

    def answer_nll(
        self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, question_states: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        """Summed next-token negative log-likelihood of each answer (pads ignored): (B,)."""
        logits = self.answer_logits(answer_ids, answer_mask, question_states, question_mask)
        targets = answer_ids.masked_fill(answer_mask == 0, -100)[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="none")
        return nll.sum(dim=1)


def _content_key(row: torch.Tensor) -> bytes:
    data = row.detach().cpu().contiguous()
    header = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.blake2b(header + data.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


def _ones_mask(embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
