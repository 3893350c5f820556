"""The shared fine-tuning loop on a toy task (tiny model, random pixels): config checks, data
order, model selection on validation, metrics files, and exact resume after an interruption."""

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from x2vlm.tasks.common import EvalContext, FinetuneTask, check_keys, shard_range
from x2vlm.train import finetune as FT

VOCAB = str(Path(__file__).parent / "data" / "parity" / "tiny_vocab.txt")


@dataclass
class ToyBatch:
    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device):
        return self


class ToySet:
    """Label = whether the image is bright; pixels drawn from the sample's rng."""

    def __init__(self, n: int, res: int):
        self.n, self.res = n, res

    def __len__(self):
        return self.n

    def get(self, index: int, rng: np.random.Generator):
        label = index % 2
        pixels = rng.normal(0.8 if label else -0.8, 0.5, size=(3, self.res, self.res)).astype(np.float32)
        return torch.from_numpy(pixels), label


def build_toy_task(data, model_cfg, tokenizer, where):
    check_keys(data, {"train_size", "probe"}, where)
    res = model_cfg.image_res
    ids, mask = tokenizer(["is it bright"], max_length=8)

    def collate(samples):
        images = torch.stack([s[0] for s in samples])
        n = len(samples)
        return ToyBatch(images, ids.expand(n, -1), mask.expand(n, -1), torch.tensor([s[1] for s in samples]))

    def logits(model, batch):
        vision, vmask = model.encode_images(batch.images)
        fused = model.encode_multimodal(batch.ids, batch.mask, vision, vmask)
        return model.classify(fused[:, 0])

    def loss(model, batch, generator):
        return {"cls": F.cross_entropy(logits(model, batch), batch.labels)}

    val = collate([ToySet(32, res).get(i, np.random.default_rng([7, i])) for i in range(32)])

    def evaluate(model, split, ctx: EvalContext):
        acc = (logits(model, val).argmax(-1) == val.labels).float().mean().item()
        return {"acc": 100 * acc, "split_len": float(len(val.labels))}

    train_set = ToySet(data.get("train_size", 64), res)

    @torch.no_grad()
    def classifier_inputs(model, ctx: EvalContext):  # the training samples drawn with the seed of epoch 0
        batch = collate([train_set.get(i, np.random.default_rng([42, 0, i])) for i in range(len(train_set))])
        vision, vmask = model.encode_images(batch.images)
        return model.encode_multimodal(batch.ids, batch.mask, vision, vmask)[:, 0], batch.labels

    return FinetuneTask("toy", "classification", train_set, collate, loss, evaluate, ["val", "test"], "acc",
                        model_changes={"num_labels": 2}, classifier_inputs=classifier_inputs if data.get("probe") else None)


@pytest.fixture
def toy_module(monkeypatch):
    module = types.ModuleType("x2vlm_toy_task")
    module.build_task = build_toy_task
    monkeypatch.setitem(sys.modules, "x2vlm_toy_task", module)
    monkeypatch.setitem(FT.TASK_MODULES, "toy", "x2vlm_toy_task")


def toy_config(out_dir, **changes):
    data = {"task": "toy", "model": "x2vlm-tiny", "model_changes": {"tokenizer": VOCAB}, "data": {"train_size": 64},
            "optimizer": {"lr": 1e-3}, "schedule": {"warmup": 0.0}, "epochs": 2, "batch_size": 8, "precision": "fp32",
            "out_dir": str(out_dir), "log_every": 1, "eval_every": 4, "tensorboard": False, **changes}
    return FT.build_finetune_config(data, "toy config")


def losses(out_dir) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_config_rejects_unknown_keys_and_tasks(toy_module):
    with pytest.raises(ValueError, match="unknown key.*'epoch'"):
        FT.build_finetune_config({"task": "toy", "epoch": 3}, "f.yaml")
    with pytest.raises(ValueError, match="task 'nope' unknown"):
        FT.build_finetune_config({"task": "nope"}, "f.yaml")
    with pytest.raises(ValueError, match="optimizer: unknown key"):
        FT.build_finetune_config({"task": "toy", "optimizer": {"learning_rate": 1}}, "f.yaml")
    with pytest.raises(ValueError, match="unknown key"):
        check_keys({"train_file": 1, "trian_file": 2}, {"train_file"}, "data")


def test_epoch_order_splits_ranks_and_drops_the_last_round():
    n, batch = 50, 4
    ranks = [FT.epoch_order(n, 3, epoch=0, rank=r, world_size=3, batch_size=batch) for r in range(3)]
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat)) == (n // (batch * 3)) * batch * 3
    assert all(len(b) == batch for r in ranks for b in r)
    assert FT.epoch_order(n, 3, 0, 0, 1, 4) == FT.epoch_order(n, 3, 0, 0, 1, 4)
    assert FT.epoch_order(n, 3, 0, 0, 1, 4) != FT.epoch_order(n, 3, 1, 0, 1, 4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        FT.epoch_order(3, 0, 0, 0, 1, 4)
    assert [list(shard_range(10, r, 3)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_finetuning_selects_on_validation_and_writes_its_files(toy_module, tmp_path):
    summary = FT.run_finetuning(toy_config(tmp_path / "run"))
    run = tmp_path / "run"
    assert (run / "best" / "model.safetensors").exists() and (run / "run.yaml").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert set(saved["results"]) == {"val", "test"}
    history = saved["validation_history"]
    assert [h["step"] for h in history] == [4, 8, 12, 16]  # 64 samples / 8 = 8 steps per epoch, 2 epochs
    best = max(history, key=lambda h: h["acc"])
    assert saved["selection"]["step"] == best["step"] and saved["selection"]["metric"] == best["acc"]
    # the final evaluation used the selected weights, which therefore reproduce the selected score
    assert saved["results"]["val"]["acc"] == pytest.approx(best["acc"])
    assert best["acc"] > 90  # the toy task is learnable: the loop really trains
    assert [s for s, _ in losses(run)] == list(range(1, 17))


def warmup_rows(out_dir) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "head_warmup_epoch" in r]


WARMUP = {"data": {"train_size": 64, "probe": True}, "head_warmup": {"epochs": 30, "lr": 1e-2, "batch_size": 16}}


@pytest.mark.parametrize("changes", [{}, WARMUP], ids=["plain", "head_warmup"])
def test_interrupted_run_resumes_exactly(toy_module, tmp_path, monkeypatch, changes):
    toy_config = lambda out_dir, **kw: globals()["toy_config"](out_dir, **changes, **kw)  # noqa: E731
    FT.run_finetuning(toy_config(tmp_path / "full", epochs=2, ckpt_every=3, keep_last=2))
    reference = losses(tmp_path / "full")

    calls = {"n": 0}
    real_save = FT.save_training_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # killed right after the step-6 checkpoint, mid-epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(FT, "save_training_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        FT.run_finetuning(toy_config(tmp_path / "cut", epochs=2, ckpt_every=3, keep_last=2))
    monkeypatch.setattr(FT, "save_training_checkpoint", real_save)
    FT.run_finetuning(toy_config(tmp_path / "cut", epochs=2, ckpt_every=3, keep_last=2))
    resumed = dict(losses(tmp_path / "cut"))
    assert len(reference) == 16
    for step, loss in reference:
        assert resumed[step] == loss, f"step {step}: {resumed[step]} != {loss}"
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert full["results"] == cut["results"] and full["selection"] == cut["selection"]
    # the warm-up ran once, before the first step: the resumed run took the head from its checkpoint
    assert len(warmup_rows(tmp_path / "cut")) == len(warmup_rows(tmp_path / "full")) == (30 if changes else 0)


def test_head_warmup_fits_the_new_head_before_fine_tuning(toy_module, tmp_path, caplog):
    for bad, message in (({"epochs": -1}, "head_warmup.epochs must be an integer >= 0"), ({"lr": 0}, "head_warmup.lr must be positive"),
                         ({"batch_size": 0}, "head_warmup.batch_size must be an integer >= 1"), ({"epoch": 2}, "head_warmup: unknown key")):
        with pytest.raises(ValueError, match=message):
            FT.build_finetune_config({"task": "toy", "head_warmup": bad}, "f.yaml")
    with pytest.raises(ValueError, match="toy: head_warmup needs a task whose head classifies fused features"):
        FT.run_finetuning(toy_config(tmp_path / "no_inputs", head_warmup={"epochs": 1}))

    FT.run_finetuning(toy_config(tmp_path / "plain", epochs=1, **{k: v for k, v in WARMUP.items() if k != "head_warmup"}))
    FT.run_finetuning(toy_config(tmp_path / "warm", epochs=1, **WARMUP))
    rows = warmup_rows(tmp_path / "warm")
    assert [r["head_warmup_epoch"] for r in rows] == list(range(1, 31)) and warmup_rows(tmp_path / "plain") == []
    assert rows[-1]["head_warmup_loss"] < rows[0]["head_warmup_loss"] and rows[-1]["head_warmup_acc"] > 90
    # fine-tuning starts from the fitted head: its first loss is far below a random head's
    assert losses(tmp_path / "warm")[0][1] < 0.5 * losses(tmp_path / "plain")[0][1]

    # a head the initialisation loaded is not refitted
    with caplog.at_level("INFO"):
        FT.run_finetuning(toy_config(tmp_path / "loaded", epochs=1, init=f"ours:{tmp_path / 'warm' / 'best'}", **WARMUP))
    assert "head warm-up skipped: the initialisation loaded cls_head" in caplog.text and warmup_rows(tmp_path / "loaded") == []


def test_evaluate_command_checks_the_model_task(toy_module, tmp_path):
    FT.run_finetuning(toy_config(tmp_path / "run", epochs=1))
    results = FT.run_evaluation(toy_config(tmp_path / "run"), tmp_path / "run" / "best", tmp_path / "eval")
    assert set(results) == {"val", "test"} and (tmp_path / "eval" / "eval_metrics.json").exists()
    from x2vlm.checkpoint import save_pretrained
    from x2vlm.config import preset
    from x2vlm.models.x2vlm import X2VLM

    save_pretrained(X2VLM(preset("x2vlm-tiny", task="retrieval", tokenizer=VOCAB)), tmp_path / "retrieval_model")
    with pytest.raises(ValueError, match="needs a 'classification' model"):
        FT.run_evaluation(toy_config(tmp_path / "run"), tmp_path / "retrieval_model")


def test_model_directory_is_found_from_a_run_a_pointer_or_itself(toy_module, tmp_path):
    from x2vlm.checkpoint import resolve_model_dir

    run = tmp_path / "run"
    FT.run_finetuning(toy_config(run, epochs=1, ckpt_every=4))
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step_00000008"
    for name in (run, run / "checkpoints", run / "checkpoints" / "latest", latest):
        assert resolve_model_dir(name) == latest
    assert resolve_model_dir(run / "best") == run / "best"
    with pytest.raises(FileNotFoundError, match="not an x2vlm model directory"):
        resolve_model_dir(tmp_path)


def test_frozen_towers_keep_their_weights_and_memoizing_changes_no_loss(toy_module, tmp_path):
    with pytest.raises(ValueError, match="freeze: unknown tower"):
        FT.build_finetune_config({"task": "toy", "freeze": ["audio"]}, "f.yaml")
    FT.run_finetuning(toy_config(tmp_path / "init", epochs=1))
    init = tmp_path / "init" / "best"
    curves = {}
    for memoize in (True, False):
        run = tmp_path / f"frozen_{memoize}"
        FT.run_finetuning(toy_config(run, epochs=1, init=f"ours:{init}", freeze=["vision", "text"], memoize_frozen=memoize))
        curves[memoize] = losses(run)
    assert [s for s, _ in curves[True]] == [s for s, _ in curves[False]] == list(range(1, 9))
    for (_, memoized), (_, recomputed) in zip(curves[True], curves[False]):
        assert memoized == pytest.approx(recomputed, rel=1e-5, abs=1e-6)

    from safetensors.torch import load_file

    before, after = load_file(init / "model.safetensors"), load_file(tmp_path / "frozen_True" / "best" / "model.safetensors")
    tower = lambda name: name.startswith(("vision_encoder.", "text_encoder.embeddings.", "text_encoder.encoder.layer.0."))  # noqa: E731
    assert any(tower(n) for n in before) and all(torch.equal(before[n], after[n]) for n in before if tower(n))
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("cls_head."))
