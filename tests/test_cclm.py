"""CCLM parallel-text pre-training (spec §3.1 "Parallel text", §3.2, §3.5): the TTC/TTM/MLM losses on
hand-checkable cases, the parallel-text source, ``x2vlm pretrain`` of a tiny converted multilingual
model with parallel text (checkpoint + exact resume including the reader position), config errors,
and the parallel text derived from the world's multilingual captions."""

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from test_pretrain_data import image_text_records, write_jsonl

from x2vlm import objectives as O
from x2vlm.cli import main as cli_main
from x2vlm.config import TextConfig, preset
from x2vlm.data.pretrain import ParallelTextBatch, PretrainLoader, SourceConfig
from x2vlm.data.stream import RawSample
from x2vlm.data.pretrain_samples import SampleDecoder, SkipSample
from x2vlm.models.bert import TextTransformer
from x2vlm.tokenizer import load_tokenizer
from x2vlm.train import pretrain as P

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [("a red circle", "ein roter kreis"), ("a blue square", "ein blaues quadrat"), ("two green stars", "zwei grüne sterne"),
         ("a small yellow cross", "ein kleines gelbes kreuz"), ("three black triangles", "drei schwarze dreiecke"),
         ("a white diamond on the left", "ein weißer diamant links"), ("one purple circle", "ein lila kreis"),
         ("an orange square below a star", "ein oranges quadrat unter einem stern")]


# -- hand-checkable losses with a stand-in model ---------------------------------------------------------
class FakeModel:
    """Text states = one-hot of the ids; the contrastive feature of a row is its (normalised) token 1
    one-hot; ``fuse``/``mlm_logits`` record what they were given."""

    def __init__(self, width: int = 16):
        self.width = width
        self.temp = torch.tensor(0.5)
        self.fused: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mlm_args = None

    def encode_text(self, ids, mask):
        return F.one_hot(ids, self.width).float().requires_grad_()

    def text_features(self, states):
        return F.normalize(states[:, 1] + 0.1 * states[:, 2], dim=-1)

    def fuse(self, text, text_mask, vision, vision_mask, vision_rows=None, cls_only=False):
        rows = vision if vision_rows is None else vision[vision_rows]  # what each text row attends to
        self.fused.append((text.detach(), rows.detach()))
        return text[:, :1] if cls_only else text

    def itm_logits(self, fused):
        return torch.zeros(fused.shape[0], 2, requires_grad=True)

    def mlm_logits(self, ids, mask, vision, vision_mask, masked_pos):
        self.mlm_args = (ids, mask, vision, vision_mask, masked_pos)
        return torch.zeros(ids.shape[0], masked_pos.shape[1], self.width, requires_grad=True)


def fake_batch(side1: list[list[int]], side2: list[list[int]], masked: dict[int, list[int]]) -> ParallelTextBatch:
    ids, ids2 = torch.tensor(side1), torch.tensor(side2)
    masked_ids = ids.clone()
    pos = torch.zeros(len(side1), 2, dtype=torch.long)
    targets = torch.full((len(side1), 2), -100)
    for row, positions in masked.items():
        for k, p in enumerate(positions):
            pos[row, k], targets[row, k] = p, ids[row, p]
            masked_ids[row, p] = 15  # [MASK]
    return ParallelTextBatch(ids, torch.ones_like(ids), masked_ids, pos, targets, ids2, torch.ones_like(ids2), ["x"] * len(side1))


SIDE1 = [[0, 1, 9, 2], [0, 2, 9, 2], [0, 3, 8, 2], [0, 4, 8, 2]]
SIDE2 = [[0, 1, 9, 2], [0, 5, 7, 2], [0, 3, 7, 2], [0, 6, 7, 2]]


def test_ttc_is_itc_between_the_two_sides_with_diagonal_targets():
    model = FakeModel()
    batch = fake_batch(SIDE1, SIDE2, {0: [1]})
    losses = O.parallel_text_losses(model, batch, torch.Generator().manual_seed(0))
    f1 = F.normalize(F.one_hot(torch.tensor(SIDE1), 16).float()[:, 1] + 0.1 * F.one_hot(torch.tensor(SIDE1), 16).float()[:, 2], dim=-1)
    f2 = F.normalize(F.one_hot(torch.tensor(SIDE2), 16).float()[:, 1] + 0.1 * F.one_hot(torch.tensor(SIDE2), 16).float()[:, 2], dim=-1)
    logits = f1 @ f2.t() / 0.5
    expected = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert losses["ttc"].item() == pytest.approx(expected.item(), rel=1e-6)
    # row 0 matches its pair exactly (cos 1); row 1's side 1 and side 2 share nothing but token 2
    assert logits[0, 0] == pytest.approx(2.0) and logits[1, 1] < logits[0, 0]
    # with ids, pairs of the same id are all positives (uniform targets)
    ids = torch.tensor([7, 7, 1, 2])
    with_ids = O.parallel_text_losses(FakeModel(), batch, torch.Generator().manual_seed(0), ids=ids)["ttc"]
    targets = ids.view(-1, 1).eq(ids.view(1, -1)).float()
    targets = targets / targets.sum(1, keepdim=True)
    manual = (-(F.log_softmax(logits, 1) * targets).sum(1) - (F.log_softmax(logits.t(), 1) * targets).sum(1)).mean() / 2
    assert with_ids.item() == pytest.approx(manual.item(), rel=1e-6)


def test_ttm_side1_is_the_kv_input_and_negatives_are_never_the_true_pair():
    batch = fake_batch(SIDE1, SIDE2, {0: [1]})
    s1 = F.one_hot(batch.text_ids, 16).float()
    s2 = F.one_hot(batch.target_ids, 16).float()
    for seed in range(40):
        model = FakeModel()
        losses = O.parallel_text_losses(model, batch, torch.Generator().manual_seed(seed))
        assert losses["ttm"].item() == pytest.approx(math.log(2))  # zero logits, labels [1]*B + [0]*2B
        (text, vision), = model.fused
        assert text.shape[0] == vision.shape[0] == 12
        # positives: (side 1 b as K/V, side 2 b as text)
        assert torch.equal(vision[:4], s1) and torch.equal(text[:4], s2)
        # which pair each negative row is made of
        vision_rows = [int((s1 == v).all(dim=(1, 2)).nonzero()) for v in vision[4:]]
        text_rows = [int((s2 == t).all(dim=(1, 2)).nonzero()) for t in text[4:]]
        assert text_rows[:4] == [0, 1, 2, 3] and vision_rows[4:] == [0, 1, 2, 3]
        assert all(v != b for b, v in enumerate(vision_rows[:4]))  # negative side 1 for side 2 b
        assert all(t != b for b, t in enumerate(text_rows[4:]))  # negative side 2 for side 1 b
        # with ids (rows 0 and 1 the same text), same-id rows are never negatives
        model = FakeModel()
        O.parallel_text_losses(model, batch, torch.Generator().manual_seed(seed), ids=torch.tensor([5, 5, 1, 2]))
        (text, vision), = model.fused
        vision_rows = [int((s1 == v).all(dim=(1, 2)).nonzero()) for v in vision[4:8]]
        text_rows = [int((s2 == t).all(dim=(1, 2)).nonzero()) for t in text[8:]]
        assert {vision_rows[0], vision_rows[1]}.isdisjoint({0, 1}) and {text_rows[0], text_rows[1]}.isdisjoint({0, 1})
    model = FakeModel()
    assert O.parallel_text_losses(model, batch, None, compute_itm=False)["ttm"].item() == 0.0 and model.fused == []


def test_mlm_is_side1_masked_ids_attending_to_side2_at_side1_masked_positions_only():
    model = FakeModel()
    batch = fake_batch(SIDE1, SIDE2, {0: [1], 2: [1, 2]})
    losses = O.parallel_text_losses(model, batch, torch.Generator().manual_seed(0))
    ids, mask, vision, vision_mask, pos = model.mlm_args
    assert torch.equal(ids, batch.masked_ids) and torch.equal(mask, batch.text_mask)
    assert torch.equal(vision, F.one_hot(batch.target_ids, 16).float()) and torch.equal(vision_mask, batch.target_mask)
    assert torch.equal(pos, batch.masked_pos)
    assert losses["mlm"].item() == pytest.approx(math.log(16))  # uniform logits over 3 counted positions
    assert batch.masked_targets.ne(-100).sum() == 3


# -- the tiny multilingual model and the parallel-text source ----------------------------------------------
@pytest.fixture(scope="module")
def ml_model(tmp_path_factory) -> Path:
    """SentencePiece on the pairs, a random RoBERTa-style encoder in the Hugging Face layout, and the tiny
    X²-VLM pre-training model converted to the multilingual layout (``convert_to_multilingual``)."""
    import sentencepiece as spm

    from x2vlm.checkpoint import convert_to_multilingual, save_pretrained
    from x2vlm.models.x2vlm import X2VLM

    root = tmp_path_factory.mktemp("cclm")
    hf = root / "xlmr"
    hf.mkdir()
    sentences = [s for pair in PAIRS for s in pair] + ["a photo of thing", "another one"] + [str(i) for i in range(30)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 3), model_writer=model, vocab_size=120, hard_vocab_limit=False,
                                   model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    (hf / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    vocab = load_tokenizer(hf).vocab_size
    (hf / "config.json").write_text(json.dumps({
        "model_type": "xlm-roberta", "vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 34, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1}))
    text_cfg = TextConfig(vocab_size=vocab, hidden_size=64, num_heads=4, intermediate_size=128, max_position_embeddings=34, type_vocab_size=1,
                          layer_norm_eps=1e-5, num_layers=2, fusion_start=2, position_style="roberta", pad_token_id=1)
    torch.manual_seed(0)
    encoder = TextTransformer(text_cfg, 2, cross_start=2, cross_width=64)
    save_file({f"roberta.{k}": v.contiguous() for k, v in encoder.state_dict().items()}, str(hf / "model.safetensors"))
    torch.manual_seed(1)
    converted, _ = convert_to_multilingual(X2VLM(preset("x2vlm-tiny", task="pretrain")), hf)
    save_pretrained(converted, root / "model", tokenizer_files=load_tokenizer(hf).files)
    return root / "model"


@pytest.fixture(scope="module")
def cclm_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cclm_data")
    write_jsonl(d / "images.jsonl", image_text_records(12))
    (d / "parallel").mkdir()
    records = [{"source_text": a, "target_text": b} for a, b in PAIRS] + [{"source_text": b, "target_text": a} for a, b in PAIRS]
    write_jsonl(d / "parallel" / "part-0.jsonl", records[::2])
    write_jsonl(d / "parallel" / "part-1.jsonl", records[1::2])
    return d


def test_parallel_source_masks_side1_only(ml_model, cclm_data):
    from x2vlm.config import X2VLMConfig

    cfg = X2VLMConfig.load(ml_model / "config.json")
    tok = load_tokenizer(ml_model)
    source = SourceConfig.from_dict({"kind": "parallel_text", "paths": [str(cclm_data / "parallel")], "batch_size": 4, "max_tokens": 16,
                                     "mask_prob": 0.4, "max_masks": 5, "whole_word": False})
    assert (source.caption_key, source.target_key) == ("source_text", "target_text")
    batch = next(iter(PretrainLoader(source, cfg, tok, seed=3)))
    assert isinstance(batch, ParallelTextBatch) and batch.text_ids.shape == batch.target_ids.shape == (4, 16)
    for row in range(4):
        length = int(batch.text_mask[row].sum())
        counted = batch.masked_targets[row].ne(-100)
        positions = batch.masked_pos[row][counted]
        assert 1 <= counted.sum() <= min(5, length - 2)
        assert ((positions > 0) & (positions < length - 1)).all()  # inside side 1, never <s> / </s> / padding
        assert torch.equal(batch.masked_targets[row][counted], batch.text_ids[row][positions])
        changed = (batch.masked_ids[row] != batch.text_ids[row]).nonzero().flatten()
        assert set(changed.tolist()) <= set(positions.tolist())  # corruption only at the masked positions
        words = tok.decode(batch.target_ids[row][batch.target_mask[row].bool()])
        assert words in {p for pair in PAIRS for p in pair}  # side 2 whole, never masked
    decoder = SampleDecoder(source, cfg, tok)
    with pytest.raises(SkipSample, match="target_text"):
        decoder(RawSample(line=b'{"source_text": "a red circle"}', source="f:1"), np.random.default_rng(0))


def cclm_run_config(model_dir: Path, data: Path, out: Path, **changes) -> dict:
    cfg = {
        "model": str(model_dir / "config.json"), "init": f"ours:{model_dir}",
        "images": {"paths": [str(data / "images.jsonl")], "batch_size": 4, "max_tokens": 12, "mask_prob": 0.4, "max_masks": 4,
                   "whole_word": False},
        "mtexts": {"paths": [str(data / "parallel")], "batch_size": 4, "max_tokens": 16, "mask_prob": 0.4, "max_masks": 5,
                   "whole_word": False, "iter_perc": 0.5, "shuffle_buffer": 4},
        "optimizer": {"lr": 1e-3}, "schedule": {"warmup": 1}, "steps": 4, "log_every": 1, "ckpt_every": 2,
        "precision": "fp32", "out_dir": str(out), "tensorboard": False,
    }
    cfg.update(changes)
    return cfg


def logged(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_pretrain_with_parallel_text_checkpoints_and_resumes_exactly(ml_model, cclm_data, tmp_path):
    full = tmp_path / "full"
    config = tmp_path / "full.yaml"
    config.write_text(yaml.safe_dump(cclm_run_config(ml_model, cclm_data, full)))
    assert cli_main(["pretrain", "--config", str(config)]) == 0
    steps = logged(full)
    assert sorted(steps) == [1, 2, 3, 4]
    for record in steps.values():
        assert {"loss_mtext_ttc", "loss_mtext_ttm", "loss_mtext_mlm", "loss_image_itc"} <= set(record)
        assert record["loss_mtext_ttm"] > 0 and record["loss_mtext_mlm"] > 0
    state = torch.load(full / "checkpoints" / "step_00000002" / "train_state_rank0.pt", weights_only=False)
    assert state["data"]["mtexts"]["kind"] == "parallel_text" and state["data"]["mtexts"]["batches_delivered"] == 2
    # resume from step 2 in another directory: steps 3 and 4 bit-identical, reader continues at its position
    resumed = tmp_path / "resumed"
    config2 = tmp_path / "resumed.yaml"
    config2.write_text(yaml.safe_dump(cclm_run_config(ml_model, cclm_data, resumed)))
    assert cli_main(["pretrain", "--config", str(config2), "--resume", str(full / "checkpoints" / "step_00000002")]) == 0
    again = logged(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step]["loss"] == steps[step]["loss"]
        assert again[step]["loss_mtext_mlm"] == steps[step]["loss_mtext_mlm"]
    end = torch.load(resumed / "checkpoints" / "step_00000004" / "train_state_rank0.pt", weights_only=False)
    assert end["data"]["mtexts"] == torch.load(full / "checkpoints" / "step_00000004" / "train_state_rank0.pt", weights_only=False)["data"]["mtexts"]


def test_weighted_total_uses_the_mtexts_iter_perc():
    sources = {"images": SimpleNamespace(iter_perc=1.0), "mtexts": SimpleNamespace(iter_perc=0.25)}
    losses = {"image_itc": torch.tensor(1.0), "mtext_ttc": torch.tensor(2.0), "mtext_ttm": torch.tensor(4.0), "mtext_mlm": torch.tensor(2.0)}
    assert P.weighted_total(losses, sources).item() == pytest.approx(1.0 + 0.25 * 8.0)


def test_config_errors(ml_model, cclm_data, tmp_path):
    # parallel text on the model with fusion layers inside the text encoder
    cfg = P.build_pretrain_config(cclm_run_config(ml_model, cclm_data, tmp_path / "x", model="x2vlm-tiny", init="scratch"), "cfg")
    with pytest.raises(ValueError, match=r"'mtexts'.*separate-cross-encoder model \(cross_num_layers > 0"):
        P.run_pretraining(cfg)
    # a cross encoder whose cross-attention width differs from the text width
    narrow = preset("x2vlm-tiny", task="pretrain").replace(cross_num_layers=2, text={"fusion_start": 6}, vision={"width": 32})
    with pytest.raises(ValueError, match=r"side-1 text states are 64 wide"):
        O.check_parallel_text_model(narrow)
    with pytest.raises(ValueError, match=r"'target_key' is only for parallel_text"):
        SourceConfig.from_dict({"kind": "text", "paths": ["x"], "batch_size": 2, "target_key": "t"})
    with pytest.raises(ValueError, match=r"'caption_key' and 'target_key' are both 'a'"):
        SourceConfig.from_dict({"kind": "parallel_text", "paths": ["x"], "batch_size": 2, "caption_key": "a", "target_key": "a"})
    with pytest.raises(ValueError, match=r"mtexts: unknown key\(s\) \['target'\]"):
        P.build_pretrain_config(cclm_run_config(ml_model, cclm_data, tmp_path / "x", mtexts={"paths": ["x"], "batch_size": 2, "target": "t"}), "cfg")


def test_world_parallel_text(tiny_world, tmp_path):
    from x2vlm.world.parallel import multilingual_image_text_records, parallel_text_records, write_cclm_world_data

    en = json.loads((tiny_world / "multilingual" / "coco_en_train.json").read_text())
    de = json.loads((tiny_world / "multilingual" / "coco_de_train.json").read_text())
    pairs = parallel_text_records(tiny_world)
    assert {"source_text": en[0]["caption"], "target_text": de[0]["caption"]} in pairs
    assert {"source_text": de[0]["caption"], "target_text": en[0]["caption"]} in pairs
    assert len({(p["source_text"], p["target_text"]) for p in pairs}) == len(pairs)
    one_way = parallel_text_records(tiny_world, both_directions=False)
    assert all(p["source_text"] in {e["caption"] for e in en} for p in one_way) and len(one_way) < len(pairs) <= 2 * len(one_way)
    images = multilingual_image_text_records(tiny_world)
    assert images[0] == {"image": en[0]["image"], "caption": {lang: json.loads((tiny_world / "multilingual" / f"coco_{lang}_train.json")
                                                                             .read_text())[0]["caption"] for lang in ("en", "de", "fr", "es")}}
    counts = write_cclm_world_data(tiny_world, tmp_path, num_shards=2)
    lines = sum(len(p.read_text().splitlines()) for p in (tmp_path / "parallel_text").glob("*.jsonl"))
    assert lines == counts["parallel_text"] == len(pairs)
