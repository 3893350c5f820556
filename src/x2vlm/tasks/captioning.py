"""COCO captioning (spec §4.5): MLM-style caption training, UniLM-style generation, COCO metrics.

Training (``Captioning_MLM.py``): a caption becomes ``[CLS] prompt caption [SEP]``; the official
MLM generator chooses positions after the prompt (``[SEP]`` included, so the model learns to stop).
With the shipped "generation-discrepancy-free" layout (``fg_free``) a ``[MASK]`` is *inserted
before* each chosen token, sharing its position id; attention is causal and no token may see a
``[MASK]`` except that ``[MASK]`` itself, so each ``[MASK]`` sees exactly what it sees at generation
time (every earlier real token) and predicts the token that follows it. Without ``fg_free`` the
chosen tokens are corrupted in place (80/10/10) under a causal mask. Loss: label-smoothed KL
(``objectives.caption_loss``), ``[CLS]`` as the ignore id of padded targets. Captions are cleaned
with ``pre_caption`` (``max_words``) before tokenisation.

Generation: beam search (or greedy) from ``[CLS] prompt``; ``max_length`` counts the tokens
generated after the prompt, so the total length is ``prompt length + max_length`` — the official
code adds the *batch size* instead of the prompt length (spec §6.5).

Evaluation: one caption per image, written as ``caption_<split>_result.json`` (COCO result format)
and scored with pycocoevalcap exactly like the COCO caption evaluation (PTB tokenisation, BLEU-1..4,
METEOR, ROUGE-L, CIDEr; SPICE is skipped). Every metric is reported x100 (BLEU-4 39.x, CIDEr 13x.x,
as papers print them). Selection metric: ``cider`` on the validation split (the official code
selects on test, spec §6.30). Splits: ``val_file``/``val_gt``, ``test_file``/``test_gt`` (a missing
gt: the file's own captions are the references), then, evaluated like test after it, the optional
``extra_eval_files: {test_novel: {file: data/novel.json, gt: data/novel_gt.json}}`` (gt optional).

SCST (``scst: true``): self-critical sequence training with a CIDEr-D reward whose document
frequencies come from the training references; a multinomial sample per image is rewarded by its
CIDEr-D minus that of the greedy caption, and its token log-probabilities (recomputed in one
parallel FG-free pass, equal to the incremental ones) are pushed up or down by that advantage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from x2vlm.config import X2VLMConfig
from x2vlm.data.masking import MaskingConfig, mask_tokens
from x2vlm.data.readers import (
    DataFormatError,
    read_coco_caption_gt,
    read_karpathy_eval,
    read_karpathy_train,
)
from x2vlm.data.text import pre_caption
from x2vlm.data.transforms import EvalTransform, FinetuneTrainTransform
from x2vlm.data.video import load_image
from x2vlm.generation import (
    CaptionSettings,
    beam_search,
    greedy_caption,
    sample_captions,
)
from x2vlm.objectives import caption_loss
from x2vlm.tasks.common import (
    EvalContext,
    FinetuneTask,
    at_least,
    bool_key,
    check_keys,
    crop_scale_key,
    existing_path,
    extra_eval_files_key,
    model_device,
    shard_range,
    typed_key,
)
from x2vlm.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a picture of "
METRIC_GROUPS = {"bleu": ("bleu_1", "bleu_2", "bleu_3", "bleu_4"), "meteor": ("meteor",), "rouge_l": ("rouge_l",), "cider": ("cider",)}
SELECTION_METRIC = "cider"


# -- settings -----------------------------------------------------------------------------------------
def check_generation_length(settings: CaptionSettings, prompt_length: int, max_positions: int) -> CaptionSettings:
    """``settings`` if a prompt of ``prompt_length`` ids plus ``max_new_tokens`` fits the position
    embeddings: positions run up to ``prompt_length + max_new_tokens - 1``, whatever the batch size."""
    if prompt_length + settings.max_new_tokens > max_positions:
        raise ValueError(f"prompt ({prompt_length} tokens) + max_length {settings.max_new_tokens} exceeds the model's "
                         f"{max_positions} position embeddings")
    return settings


# -- training sequences ---------------------------------------------------------------------------
@dataclass
class CaptionSequence:
    """One training row: model inputs plus the prediction targets."""

    input_ids: list[int]
    position_ids: list[int]
    inserted_mask: list[bool]  # True: an inserted [MASK] no other token may attend to
    masked_pos: list[int]  # indices into input_ids whose outputs are predicted
    masked_ids: list[int]  # the tokens to predict there


def fg_free_layout(token_ids: Sequence[int], positions: Sequence[int], mask_id: int) -> CaptionSequence:
    """Insert a ``[MASK]`` before every chosen position (sorted); it shares the position id of the
    token it precedes and predicts that token."""
    chosen = set(positions)
    ids, pos, inserted, masked_pos, masked_ids = [], [], [], [], []
    for p, token in enumerate(token_ids):
        if p in chosen:
            masked_pos.append(len(ids))
            masked_ids.append(int(token))
            ids.append(mask_id)
            pos.append(p)
            inserted.append(True)
        ids.append(int(token))
        pos.append(p)
        inserted.append(False)
    return CaptionSequence(ids, pos, inserted, masked_pos, masked_ids)


def in_place_layout(corrupted_ids: Sequence[int], positions: Sequence[int], original_ids: Sequence[int]) -> CaptionSequence:
    """Classic MLM: chosen tokens corrupted where they stand, predicted there (causal attention)."""
    n = len(corrupted_ids)
    return CaptionSequence(list(corrupted_ids), list(range(n)), [False] * n, list(positions), list(original_ids))


def caption_attention(inserted_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) flags -> (B, L, L) 0/1 attention: causal, with every inserted ``[MASK]`` column zeroed
    except on its own diagonal."""
    length = inserted_mask.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.long, device=inserted_mask.device))
    attention = causal.expand(inserted_mask.shape[0], -1, -1).clone()
    attention.masked_fill_(inserted_mask.unsqueeze(1).bool(), 0)
    diagonal = torch.arange(length, device=inserted_mask.device)
    attention[:, diagonal, diagonal] = 1
    return attention


@dataclass
class CaptionBatch:
    images: torch.Tensor | None
    input_ids: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    attention: torch.Tensor  # (B, L, L)
    masked_pos: torch.Tensor  # (B, M)
    masked_ids: torch.Tensor  # (B, M), padded with the ignore id ([CLS])
    masked_weight: torch.Tensor  # (B, M) 1 real / 0 padding

    def to(self, device) -> CaptionBatch:
        return CaptionBatch(*(None if t is None else t.to(device) for t in
                              (self.images, self.input_ids, self.position_ids, self.attention, self.masked_pos,
                               self.masked_ids, self.masked_weight)))


def collate_sequences(rows: Sequence[CaptionSequence], pad_id: int, ignore_id: int, images: torch.Tensor | None = None) -> CaptionBatch:
    """Pad to the longest row (padding at the end is invisible to earlier tokens under causal
    attention, so this equals the official fixed-length padding); pad position ids keep increasing."""
    length = max(len(r.input_ids) for r in rows)
    masks = max(1, max(len(r.masked_pos) for r in rows))
    batch = len(rows)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    positions = torch.zeros((batch, length), dtype=torch.long)
    inserted = torch.zeros((batch, length), dtype=torch.bool)
    masked_pos = torch.zeros((batch, masks), dtype=torch.long)
    masked_ids = torch.full((batch, masks), ignore_id, dtype=torch.long)
    weight = torch.zeros((batch, masks), dtype=torch.long)
    for b, row in enumerate(rows):
        n, k = len(row.input_ids), len(row.masked_pos)
        ids[b, :n] = torch.tensor(row.input_ids)
        positions[b, :n] = torch.tensor(row.position_ids)
        positions[b, n:] = row.position_ids[-1] + 1 + torch.arange(length - n)
        inserted[b, :n] = torch.tensor(row.inserted_mask)
        if k:
            masked_pos[b, :k] = torch.tensor(row.masked_pos)
            masked_ids[b, :k] = torch.tensor(row.masked_ids)
            weight[b, :k] = 1
    return CaptionBatch(images, ids, positions, caption_attention(inserted), masked_pos, masked_ids, weight)


@dataclass(frozen=True)
class CaptionEncoder:
    """Caption text -> masked training row (tokenisation, official masking, layout)."""

    tokenizer: WordPieceTokenizer
    prompt_ids: tuple[int, ...]  # [CLS] + prompt pieces
    masking: MaskingConfig
    max_tokens: int
    max_words: int
    fg_free: bool

    def token_ids(self, caption: str) -> list[int]:
        """``[CLS] prompt caption [SEP]`` cut to ``max_tokens`` (the [SEP] is kept)."""
        tok = self.tokenizer
        caption_ids = tok.encode_one(pre_caption(caption, self.max_words))[1:-1]
        room = self.max_tokens - len(self.prompt_ids) - 1
        return [*self.prompt_ids, *caption_ids[:room], tok.sep_token_id]

    def encode(self, caption: str, rng: np.random.Generator) -> CaptionSequence:
        tok = self.tokenizer
        ids = self.token_ids(caption)
        tokens = [tok.id_to_token[i] for i in ids]
        corrupted, positions, originals = mask_tokens(
            ids, tokens, self.masking, rng, tok.vocab_size, tok.special_ids, tok.mask_token_id,
            num_protected=len(self.prompt_ids) - 1, maskable_ids=(tok.sep_token_id,))
        if self.fg_free:
            return fg_free_layout(ids, positions, tok.mask_token_id)
        return in_place_layout(corrupted, positions, originals)


def _resolve(root: str | None, path: str) -> str:
    return str(Path(root) / path) if root and not Path(path).is_absolute() else path


class CaptionTrainSet:
    """Karpathy train pairs -> (image tensor, masked caption row)."""

    def __init__(self, pairs, image_root: str, transform: FinetuneTrainTransform, encoder: CaptionEncoder, source: str):
        self.pairs, self.image_root, self.transform, self.encoder, self.source = pairs, image_root, transform, encoder, source

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, index: int, rng: np.random.Generator):
        pair = self.pairs[index]
        image = load_image(_resolve(self.image_root, pair.image), is_path=True, source=f"{self.source}[{index}]", field="image")
        pixels = self.transform(image, rng, texts=pair.caption)  # the flip is caption-aware
        return pixels, self.encoder.encode(pair.caption, rng)


# -- evaluation -------------------------------------------------------------------------------------
@dataclass
class CaptionSplit:
    """An evaluation split: images, their COCO image ids and reference captions."""

    name: str
    file: str
    images: list[str]
    image_ids: list[int]
    references: dict[int, list[str]]


def image_id_from_file_name(path: str, where: str) -> int:
    """COCO's ``.../COCO_val2014_000000391895.jpg`` -> 391895 (the last digit run of the name)."""
    digits = re.findall(r"\d+", Path(path).stem)
    if not digits:
        raise DataFormatError(f"{where}: field 'image': no image id in the file name {path!r}; set data key 'image_id_key'")
    return int(digits[-1])


def load_caption_split(name: str, file: str, gt_file: str | None, image_id_key: str | None) -> CaptionSplit:
    """Read a Karpathy eval file and (if given) its COCO-format ground truth; without one the
    references are the eval file's captions."""
    items = read_karpathy_eval(file, index_key=image_id_key)
    image_ids = []
    for k, item in enumerate(items):
        if image_id_key is None:
            image_ids.append(image_id_from_file_name(item.image, f"{file}[{k}]"))
        elif isinstance(item.index, int):
            image_ids.append(item.index)
        else:
            raise DataFormatError(f"{file}[{k}]: field {image_id_key!r}: expected an integer image id, got {item.index!r}")
    duplicates = [i for i, c in Counter(image_ids).items() if c > 1]
    if duplicates:
        raise DataFormatError(f"{file}: image id {duplicates[0]} appears more than once")
    if gt_file is None:
        references = {i: list(item.captions) for i, item in zip(image_ids, items)}
    else:
        references = read_coco_caption_gt(gt_file)
        missing = [i for i in image_ids if not references.get(i)]
        if missing:
            raise DataFormatError(f"{file}: image id {missing[0]} has no caption in {gt_file} "
                                  f"({len(missing)} of {len(image_ids)} images missing)")
        references = {i: references[i] for i in image_ids}
    return CaptionSplit(name, file, [it.image for it in items], image_ids, references)


def decode_caption(tokenizer: WordPieceTokenizer, ids: Sequence[int]) -> str:
    """Generated ids -> text, stopping at the first [SEP]."""
    ids = list(ids)
    if tokenizer.sep_token_id in ids:
        ids = ids[: ids.index(tokenizer.sep_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_captions(model, pixels: torch.Tensor, prompt_ids: torch.Tensor, gen: CaptionSettings, tokenizer: WordPieceTokenizer) -> list[str]:
    """One caption per image (beam search, or greedy when ``gen.greedy``)."""
    vision, vision_mask = model.encode_images(pixels)
    settings = check_generation_length(gen, len(prompt_ids), model.cfg.text.max_position_embeddings)
    if settings.greedy:
        sequences = greedy_caption(model, vision, vision_mask, prompt_ids, settings.max_new_tokens, settings.min_length)
    else:
        sequences = beam_search(model, vision, vision_mask, prompt_ids, settings)
    return [decode_caption(tokenizer, s) for s in sequences]


_SPICE_NOTE = {"logged": False}


def score_captions(references: dict[int, list[str]], candidates: dict[int, str], metrics: Sequence[str] = tuple(METRIC_GROUPS)) -> dict[str, float]:
    """The COCO caption evaluation (pycocoevalcap): PTB-tokenise references and candidates, then
    BLEU-1..4 / METEOR / ROUGE-L / CIDEr as asked; every score x100. Needs ``java`` on the PATH."""
    unknown = sorted(set(metrics) - set(METRIC_GROUPS))
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; known: {sorted(METRIC_GROUPS)}")
    if set(candidates) != set(references):
        raise ValueError(f"candidates cover {len(candidates)} images, references {len(references)}; they must be the same images")
    if shutil.which("java") is None:
        raise RuntimeError("the COCO caption metrics run Stanford's PTB tokenizer and METEOR, which need `java` on the PATH")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not _SPICE_NOTE["logged"]:
        log.info("caption metrics: SPICE is skipped (it downloads Stanford CoreNLP models at run time)")
        _SPICE_NOTE["logged"] = True
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": candidates[i]}] for i in references})
    result = {}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress
        for group in metrics:
            scorer = _scorer(group)
            score, _ = scorer.compute_score(gts, res)
            values = score if isinstance(score, list) else [score]
            for key, value in zip(METRIC_GROUPS[group], values):
                result[key] = 100.0 * float(value)
            del scorer  # METEOR: stops its java process
    return result


def _scorer(group: str):
    if group == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4)
    if group == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()
    if group == "rouge_l":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge()
    from pycocoevalcap.cider.cider import Cider

    return Cider()


def _load_pixels(split: CaptionSplit, indices: Sequence[int], image_root: str, transform: EvalTransform) -> torch.Tensor:
    return torch.stack([
        transform(load_image(_resolve(image_root, split.images[i]), is_path=True, source=f"{split.file}[{i}]", field="image"))
        for i in indices])


def _gather_objects(local: list, ctx: EvalContext) -> list:
    if not ctx.dist_info.distributed:
        return local
    import torch.distributed as dist

    parts = [None] * ctx.dist_info.world_size
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def _broadcast_object(value, ctx: EvalContext):
    if not ctx.dist_info.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def caption_split(model, split: CaptionSplit, indices: Sequence[int], image_root: str, prompt_ids: torch.Tensor,
                  gen: CaptionSettings, tokenizer: WordPieceTokenizer, batch_size: int, autocast=None) -> list[str]:
    """Captions for ``split.images[indices]`` in batches of ``batch_size``."""
    transform = EvalTransform(model.cfg.image_res)
    device = model_device(model)
    captions: list[str] = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        pixels = _load_pixels(split, chunk, image_root, transform).to(device)
        with (autocast or nullcontext)():
            captions.extend(generate_captions(model, pixels, prompt_ids, gen, tokenizer))
    return captions


def evaluate_captions(model, split: CaptionSplit, ctx: EvalContext, image_root: str, prompt_ids: torch.Tensor,
                      gen: CaptionSettings, tokenizer: WordPieceTokenizer, metrics: Sequence[str]) -> dict[str, float]:
    """Caption every image (split across ranks), write the COCO result file, score on the main rank."""
    model.eval()
    mine = list(shard_range(len(split.images), ctx.dist_info.rank, ctx.dist_info.world_size))
    captions = caption_split(model, split, mine, image_root, prompt_ids, gen, tokenizer, ctx.batch_size, ctx.autocast)
    results = _gather_objects([{"image_id": split.image_ids[i], "caption": c} for i, c in zip(mine, captions)], ctx)
    scores = None
    if ctx.dist_info.is_main:
        if ctx.out_dir is not None:
            out = Path(ctx.out_dir) / f"caption_{split.name}_result.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results) + "\n")
            log.info("wrote %d captions to %s", len(results), out)
        scores = score_captions(split.references, {r["image_id"]: r["caption"] for r in results}, metrics)
    return _broadcast_object(scores, ctx)


def draw_captions(model, split: CaptionSplit, out_dir: Path, image_root: str, prompt_ids: torch.Tensor,
                  gen: CaptionSettings, tokenizer: WordPieceTokenizer, count: int) -> list[Path]:
    """PNGs of the first ``count`` images with the generated caption and up to three references."""
    from PIL import Image

    from x2vlm.world.show import with_text

    model.eval()
    indices = list(range(min(count, len(split.images))))
    captions = caption_split(model, split, indices, image_root, prompt_ids, gen, tokenizer, batch_size=max(1, len(indices)))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, caption in zip(indices, captions):
        image = load_image(_resolve(image_root, split.images[i]), is_path=True, source=f"{split.file}[{i}]", field="image")
        scale = 288 / max(image.size)
        picture = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                               Image.NEAREST if scale > 1 else Image.BICUBIC)
        refs = split.references[split.image_ids[i]][:3]
        lines = [f"image {split.image_ids[i]}", f"generated: {caption}", *(f"reference: {r}" for r in refs)]
        path = out_dir / f"caption_{split.name}_{split.image_ids[i]}.png"
        with_text(picture, lines).save(path)
        paths.append(path)
    return paths


# -- CIDEr-D -----------------------------------------------------------------------------------------
_NON_WORD = re.compile(r"[^\w\s]")


def caption_words(text: str) -> list[str]:
    """Lower-cased words without punctuation (the n-gram units of CIDEr-D)."""
    return _NON_WORD.sub(" ", text.lower()).split()


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D (Vedantam et al.; the SCST reward): tf-idf n-gram (1..4) vectors, per-n cosine with
    the candidate's weights clipped at the reference's, a Gaussian length penalty (sigma 6), the mean
    over n and references, x10. Document frequencies come from ``corpus`` (per image, its references),
    for SCST the training set. Lengths are word counts (pycocoevalcap counts bigrams, one fewer)."""

    def __init__(self, corpus: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0):
        if not corpus:
            raise ValueError("CIDEr-D needs a non-empty reference corpus")
        self.n, self.sigma = n, sigma
        self.document_frequency: Counter = Counter()
        for references in corpus:
            self.document_frequency.update({g for ref in references for g in _ngram_counts(caption_words(ref), n)})
        self.log_corpus_size = math.log(float(len(corpus)))

    def _vector(self, words: Sequence[str]) -> tuple[list[dict], list[float]]:
        vec: list[dict] = [{} for _ in range(self.n)]
        for gram, tf in _ngram_counts(words, self.n).items():
            idf = self.log_corpus_size - math.log(max(1.0, self.document_frequency[gram]))
            vec[len(gram) - 1][gram] = tf * idf
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        return vec, norms

    def score(self, candidate: str, references: Sequence[str]) -> float:
        if not references:
            raise ValueError("CIDEr-D needs at least one reference")
        words = caption_words(candidate)
        vec, norms = self._vector(words)
        total = np.zeros(self.n)
        for ref in references:
            ref_words = caption_words(ref)
            ref_vec, ref_norms = self._vector(ref_words)
            penalty = math.exp(-((len(words) - len(ref_words)) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                overlap = sum(min(v, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, v in vec[k].items())
                if norms[k] and ref_norms[k]:
                    overlap /= norms[k] * ref_norms[k]
                total[k] += overlap * penalty
        return float(10.0 * total.mean() / len(references))


# -- SCST --------------------------------------------------------------------------------------------
@dataclass
class ScstBatch:
    images: torch.Tensor
    rows: torch.Tensor  # index of each image's references in the reward's table

    def to(self, device) -> ScstBatch:
        return ScstBatch(self.images.to(device), self.rows)


class ScstTrainSet:
    """One item per training image: (image tensor, its row in ``references``)."""

    def __init__(self, pairs, image_root: str, transform: FinetuneTrainTransform, source: str):
        grouped: dict[str, list[str]] = defaultdict(list)
        for pair in pairs:
            grouped[pair.image].append(pair.caption)
        self.images = list(grouped)
        self.references = [grouped[image] for image in self.images]
        self.image_root, self.transform, self.source = image_root, transform, source

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int, rng: np.random.Generator):
        image = load_image(_resolve(self.image_root, self.images[index]), is_path=True, source=self.source, field="image")
        return self.transform(image, rng, texts=self.references[index]), index


def sequence_log_probs(model, vision: torch.Tensor, vision_mask: torch.Tensor, prompt_ids: Sequence[int],
                       generated: Sequence[Sequence[int]], tokenizer: WordPieceTokenizer) -> torch.Tensor:
    """Summed log-probability of each generated continuation, from one parallel FG-free pass (a
    [MASK] before every generated token sees what the incremental decoder saw)."""
    prompt = [int(i) for i in prompt_ids]
    rows = [fg_free_layout(prompt + list(g), range(len(prompt), len(prompt) + len(g)), tokenizer.mask_token_id) for g in generated]
    batch = collate_sequences(rows, tokenizer.pad_token_id, tokenizer.cls_token_id).to(vision.device)
    logits = model.mlm_logits(batch.input_ids, batch.attention, vision, vision_mask, batch.masked_pos, batch.position_ids)
    picked = F.log_softmax(logits.float(), dim=-1).gather(-1, batch.masked_ids.unsqueeze(-1)).squeeze(-1)
    return (picked * batch.masked_weight).sum(dim=1)


def scst_loss(log_probs: torch.Tensor, sample_rewards: torch.Tensor, baseline_rewards: torch.Tensor) -> torch.Tensor:
    """Self-critical policy gradient: ``-mean((r(sample) - r(greedy)) * log p(sample))``."""
    advantage = (sample_rewards - baseline_rewards).to(log_probs)
    return -(advantage * log_probs).mean()


@dataclass
class ScstObjective:
    """Sample + greedy baseline (no gradient, eval mode), CIDEr-D rewards, policy-gradient loss.
    No ``min_length`` here: the sampled tokens' log-probabilities are the model's own."""

    reward: CiderD
    references: list[list[str]]
    prompt_ids: torch.Tensor
    tokenizer: WordPieceTokenizer
    max_length: int
    samples_per_image: int = 1

    def __call__(self, model, batch: ScstBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        vision, vision_mask = model.encode_images(batch.images)
        k = self.samples_per_image
        was_training = model.training
        model.eval()
        with torch.no_grad():
            greedy = greedy_caption(model, vision.detach(), vision_mask, self.prompt_ids, self.max_length)
            sampled, _ = sample_captions(model, vision.detach().repeat_interleave(k, 0), vision_mask.repeat_interleave(k, 0),
                                         self.prompt_ids, self.max_length, generator)
        model.train(was_training)
        rows = batch.rows.tolist()
        baseline = [self._reward(greedy[b], rows[b]) for b in range(len(rows))]
        sample_rewards = torch.tensor([self._reward(s, rows[i // k]) for i, s in enumerate(sampled)])
        baseline_rewards = torch.tensor(baseline).repeat_interleave(k)
        log_probs = sequence_log_probs(model, vision.repeat_interleave(k, 0), vision_mask.repeat_interleave(k, 0),
                                       self.prompt_ids.tolist(), sampled, self.tokenizer)
        log.debug("scst: sample CIDEr-D %.3f, greedy %.3f", float(sample_rewards.mean()), float(baseline_rewards.mean()))
        return {"scst": scst_loss(log_probs, sample_rewards, baseline_rewards)}

    def _reward(self, ids: Sequence[int], row: int) -> float:
        return self.reward.score(decode_caption(self.tokenizer, ids), self.references[row])


# -- the task ----------------------------------------------------------------------------------------
DATA_KEYS = {
    "train_file", "val_file", "val_gt", "test_file", "test_gt", "extra_eval_files", "image_root", "image_id_key",
    "max_tokens", "max_words", "prompt", "mask_prob", "max_masks", "whole_word", "skipgram_prb", "skipgram_size",
    "fg_free", "label_smoothing", "crop_scale", "randaugment", "hflip",
    "num_beams", "min_length", "max_length", "length_penalty", "block_repeated_trigrams", "greedy",
    "metrics", "scst", "scst_samples", "draw_images",
}


def generation_settings(data: dict, where: str) -> CaptionSettings:
    """The decoding settings of a data section (``num_beams``, ``min_length``, ``max_length``,
    ``length_penalty``, ``block_repeated_trigrams``, ``greedy``); ``{}`` gives the task's defaults."""
    return CaptionSettings(
        num_beams=at_least(typed_key(data, "num_beams", int, 3, where), "num_beams", where),
        min_length=at_least(typed_key(data, "min_length", int, 5, where), "min_length", where, 0),
        max_new_tokens=at_least(typed_key(data, "max_length", int, 50, where), "max_length", where),
        length_penalty=typed_key(data, "length_penalty", float, 0.0, where),
        block_repeated_trigrams=bool_key(data, "block_repeated_trigrams", True, where),
        greedy=bool_key(data, "greedy", False, where))


def build_task(data: dict, model_cfg: X2VLMConfig, tokenizer: WordPieceTokenizer, where: str) -> FinetuneTask:
    check_keys(data, DATA_KEYS, where)
    image_root = typed_key(data, "image_root", str, None, where)
    if image_root is None:
        raise ValueError(f"{where}: missing key 'image_root'")
    train_files = typed_key(data, "train_file", (str, list), None, where)
    if train_files is None:
        raise ValueError(f"{where}: missing key 'train_file' (Karpathy train json, or a list of them)")
    train_files = [train_files] if isinstance(train_files, str) else train_files
    if not train_files or not all(isinstance(f, str) for f in train_files):
        raise ValueError(f"{where}: key 'train_file': expected a path or a non-empty list of paths, got {train_files!r}")
    max_positions = model_cfg.text.max_position_embeddings

    prompt = typed_key(data, "prompt", str, DEFAULT_PROMPT, where)
    prompt_ids = tokenizer.encode_one(prompt)[:-1]  # [CLS] + prompt pieces, no [SEP]
    max_tokens = at_least(typed_key(data, "max_tokens", int, 40, where), "max_tokens", where, len(prompt_ids) + 2)
    masking = MaskingConfig(
        mask_prob=typed_key(data, "mask_prob", float, 0.6, where), max_masks=typed_key(data, "max_masks", int, 18, where),
        whole_word=bool_key(data, "whole_word", True, where), skipgram_prb=typed_key(data, "skipgram_prb", float, 0.2, where),
        skipgram_size=typed_key(data, "skipgram_size", int, 3, where))
    fg_free = bool_key(data, "fg_free", True, where)
    longest = max_tokens + (masking.max_masks if fg_free else 0)
    if longest > max_positions:
        raise ValueError(f"{where}: max_tokens {max_tokens}{' + max_masks ' + str(masking.max_masks) if fg_free else ''} "
                         f"exceeds the model's {max_positions} position embeddings")
    gen = generation_settings(data, where)
    check_generation_length(gen, len(prompt_ids), max_positions)  # fails early on too long generation
    metrics = typed_key(data, "metrics", list, list(METRIC_GROUPS), where)
    unknown = sorted(set(metrics) - set(METRIC_GROUPS))
    if unknown or SELECTION_METRIC not in metrics:
        raise ValueError(f"{where}: key 'metrics': {metrics!r}; choose from {list(METRIC_GROUPS)} (cider is required: it selects the model)")
    transform = FinetuneTrainTransform(model_cfg.image_res, scale=crop_scale_key(data, where),
                                       randaug=bool_key(data, "randaugment", True, where),
                                       hflip=bool_key(data, "hflip", True, where))
    image_id_key = typed_key(data, "image_id_key", str, None, where)
    extra_files = extra_eval_files_key(data, where, fields=("file", "gt"))

    splits: dict[str, CaptionSplit] = {}
    for name in ("val", "test"):
        file = existing_path(typed_key(data, f"{name}_file", str, None, where), f"{name}_file", where)
        gt = existing_path(typed_key(data, f"{name}_gt", str, None, where), f"{name}_gt", where)
        if file is None:
            if gt is not None:
                raise ValueError(f"{where}: key '{name}_gt' given without '{name}_file'")
            continue
        if gt is None:
            log.info("%s: no %s_gt; the references of %s are the captions of %s", where, name, name, file)
        splits[name] = load_caption_split(name, file, gt, image_id_key)
    if not splits:
        raise ValueError(f"{where}: give 'val_file' (model selection) and/or 'test_file'")
    draw_split = splits[list(splits)[-1]]  # test (or val): the extra splits are not drawn
    for name, files in extra_files.items():  # evaluated like test, after it
        if files["gt"] is None:
            log.info("%s: no extra_eval_files.%s.gt; the references of %s are the captions of %s", where, name, name, files["file"])
        splits[name] = load_caption_split(name, files["file"], files["gt"], image_id_key)

    max_words = typed_key(data, "max_words", int, 40, where)
    pairs = []
    for file in train_files:
        file_pairs = read_karpathy_train(existing_path(file, "train_file", where))
        for k, pair in enumerate(file_pairs):
            try:
                pre_caption(pair.caption, max_words)
            except ValueError:
                raise DataFormatError(f"{file}[{k}]: field 'caption': no words left after cleaning ({pair.caption!r})") from None
        pairs.extend(file_pairs)
    if not pairs:
        raise ValueError(f"{where}: the training files {train_files} hold no caption")
    source = ",".join(train_files)
    prompt_tensor = torch.tensor(prompt_ids)

    if bool_key(data, "scst", False, where):
        train_set = ScstTrainSet(pairs, image_root, transform, source)
        samples = at_least(typed_key(data, "scst_samples", int, 1, where), "scst_samples", where)
        objective = ScstObjective(CiderD(train_set.references), train_set.references, prompt_tensor, tokenizer, gen.max_new_tokens, samples)

        def collate(samples_):
            return ScstBatch(torch.stack([s[0] for s in samples_]), torch.tensor([s[1] for s in samples_]))

        loss = objective
    else:
        encoder = CaptionEncoder(tokenizer, tuple(prompt_ids), masking, max_tokens, max_words, fg_free)
        train_set = CaptionTrainSet(pairs, image_root, transform, encoder, source)
        smoothing = typed_key(data, "label_smoothing", float, 0.1, where)

        def collate(samples_):
            images = torch.stack([s[0] for s in samples_])
            return collate_sequences([s[1] for s in samples_], tokenizer.pad_token_id, tokenizer.cls_token_id, images)

        def loss(model, batch: CaptionBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
            vision, vision_mask = model.encode_images(batch.images)
            logits = model.mlm_logits(batch.input_ids, batch.attention, vision, vision_mask, batch.masked_pos, batch.position_ids)
            return {"caption": caption_loss(logits, batch.masked_ids, batch.masked_weight, smoothing, ignore_id=tokenizer.cls_token_id)}

    def evaluate(model, split: str, ctx: EvalContext) -> dict[str, float]:
        if split not in splits:
            raise ValueError(f"captioning: no split {split!r}; configured: {list(splits)}")
        return evaluate_captions(model, splits[split], ctx, image_root, prompt_tensor, gen, tokenizer, metrics)

    draw_count = at_least(typed_key(data, "draw_images", int, 4, where), "draw_images", where, 0)

    def draw(model, out_dir: Path, ctx: EvalContext) -> list[Path]:
        with (ctx.autocast or nullcontext)():
            return draw_captions(model, draw_split, Path(out_dir), image_root, prompt_tensor, gen, tokenizer, draw_count)

    return FinetuneTask("captioning", "captioning", train_set, collate, loss, evaluate, list(splits), SELECTION_METRIC,
                        draw=draw if draw_count else None,
                        inference_files={"inference.json": {"task": "captioning", "prompt": prompt,
                                                            "generation": dataclasses.asdict(gen)}})

