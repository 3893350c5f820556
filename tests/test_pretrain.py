"""Pre-training loop: configs, DDP equivalence, exact resume after SIGKILL, safe checkpoints, guards."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_pretrain_data import image_text_records, region_record, write_jsonl, write_video

from x2vlm.data.pretrain import BadDataError
from x2vlm.train import pretrain as P
from x2vlm.train import state as S

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "src" / "x2vlm" / "configs" / "pretrain").glob("*.yaml"))
TINY_VOCAB = str(ROOT / "tests" / "data" / "parity" / "tiny_vocab.txt")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pretrain_data")
    write_jsonl(d / "images.jsonl", image_text_records(24))
    write_jsonl(d / "regions.jsonl", [region_record(i) for i in range(12)])
    for i in range(2):
        write_video(d / f"clip{i}.mp4")
    write_jsonl(d / "videos.jsonl", [{"video_frames": str(d / f"clip{i % 2}.mp4"), "text": f"a clip number {i}"} for i in range(6)])
    write_jsonl(d / "texts.jsonl", [{"text": f"some words number {i} here"} for i in range(16)])
    return d


def run_config(data_dir: Path, out_dir: Path, **changes) -> dict:
    common = {"max_tokens": 12, "max_masks": 4}
    cfg = {
        "model": "x2vlm-tiny",
        "model_changes": {"tokenizer": TINY_VOCAB},
        "images": {"paths": [str(data_dir / "images.jsonl")], "batch_size": 4, "shuffle_buffer": 8, **common},
        "regions": {"paths": [str(data_dir / "regions.jsonl")], "batch_size": 6, "max_images": 2, **common},
        "videos": {"paths": [str(data_dir / "videos.jsonl")], "batch_size": 2, "frame_len": 3, "image_is_path": True, **common},
        "texts": {"paths": [str(data_dir / "texts.jsonl")], "batch_size": 4, **common},
        "optimizer": {"lr": 1e-3},
        "schedule": {"warmup": 2},
        "steps": 8,
        "log_every": 1,
        "ckpt_every": 3,
        "out_dir": str(out_dir),
        "tensorboard": False,
    }
    cfg.update(changes)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses_by_step(out_dir: Path) -> dict[int, float]:
    """Last logged total loss of every step (a resumed run logs some steps twice)."""
    result = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        result[record["step"]] = record["loss"]
    return result


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse(path):
    cfg = P.load_pretrain_config(path)
    assert cfg.steps > 0
    if path.stem == "small_world_localization":  # the embedded default's stage 3: boxes + image ITC/ITM on frozen towers
        assert cfg.videos is None and cfg.regions.boxes_only and cfg.freeze == ["vision", "text"]
        assert not cfg.images.mlm and cfg.itm_negatives == "random"
        return
    assert cfg.images is not None and cfg.images.kind == "image_text"
    if path.stem == "small_world_stage1":  # the image-text warm-up stage of the embedded default
        assert cfg.regions is None and cfg.videos is None and cfg.stop_calc_itm == 0
        assert cfg.text_tower_frozen_steps == cfg.steps
    elif path.stem == "cclm_small_world":  # CCLM on the world: its region texts are English only
        assert cfg.regions is None and cfg.mtexts.kind == "parallel_text"
    else:
        assert cfg.regions is not None and cfg.regions.kind == "region_text"
    if path.stem.startswith("cclm_x2vlm"):  # spec §3.5: WikiMatrix parallel text settings
        m = cfg.mtexts
        assert (m.kind, m.caption_key, m.target_key, m.max_tokens, m.mask_prob, m.max_masks, m.whole_word) == (
            "parallel_text", "source_text", "target_text", 64, 0.4, 16, False)
    if "stage2" in path.stem:
        assert cfg.videos.kind == "video_text" and cfg.videos.frame_len == 3


def test_overrides_and_unknown_keys(tmp_path):
    cfg = P.load_pretrain_config(CONFIGS[0], ["optimizer.lr=3e-4", "steps=10", "images.batch_size=2"])
    assert (cfg.optimizer.lr, cfg.steps, cfg.images.batch_size) == (3e-4, 10, 2)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stpes'\]"):
        P.load_pretrain_config(CONFIGS[0], ["stpes=10"])
    with pytest.raises(ValueError, match=r"optimizer: unknown key\(s\) \['lrr'\]"):
        P.load_pretrain_config(CONFIGS[0], ["optimizer.lrr=1"])
    with pytest.raises(ValueError, match="images"):
        P.load_pretrain_config(CONFIGS[0], ["images.batchsize=2"])


def test_two_ranks_equal_one_process_with_the_concatenated_batch(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): ITC across ranks, ITM, MLM losses and every gradient."""
    result = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "tests" / "scripts" / "ddp_equivalence.py"), str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads(result.read_text())
    for name, value in verdict["ref_losses"].items():
        assert verdict["dist_losses"][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    assert verdict["grad_presence_mismatch"] == []
    assert verdict["max_grad_diff"] < 2e-5


def test_killed_run_resumes_with_the_exact_loss_sequence(tmp_path, data_dir):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / "full.yaml", run_config(data_dir, full_dir))))
    expected = losses_by_step(full_dir)
    assert sorted(expected) == list(range(1, 9))

    config = write_config(tmp_path / "killed.yaml", run_config(data_dir, killed_dir))
    cmd = [sys.executable, "-m", "x2vlm.cli", "pretrain", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:  # past the step-3 checkpoint
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = S.latest_checkpoint(killed_dir)
    assert latest is not None and latest.name in ("step_00000003", "step_00000006")
    P.run_pretraining(P.load_pretrain_config(config))  # picks up checkpoints/latest
    resumed = losses_by_step(killed_dir)
    assert resumed == expected  # bit-identical floats, fp32 on CPU


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "run"
    cfg = P.load_pretrain_config(write_config(tmp_path / "c.yaml", run_config(data_dir, out, steps=6)))
    real_save = S.save_pretrained
    calls = {"n": 0}

    def crash_on_second(model, directory, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(model, directory)
            (Path(directory) / "model.safetensors").write_bytes(b"half a file")
            raise KeyboardInterrupt("simulated crash while writing")
        return real_save(model, directory, *args, **kwargs)

    monkeypatch.setattr(S, "save_pretrained", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        P.run_pretraining(cfg)
    assert S.latest_checkpoint(out).name == "step_00000003"
    assert not (out / "checkpoints" / "step_00000006").exists()
    monkeypatch.setattr(S, "save_pretrained", real_save)
    P.run_pretraining(cfg)  # resumes from step 3 despite the staging leftovers
    assert S.latest_checkpoint(out).name == "step_00000006"


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_non_finite_loss_stops_with_step_sources_and_checkpoint(tmp_path, data_dir, monkeypatch, step_in_backward):
    changes = {"step_in_backward": True, "grad_clip": 0.0} if step_in_backward else {}
    cfg = P.load_pretrain_config(write_config(tmp_path / "c.yaml", run_config(data_dir, tmp_path / "run", steps=6, **changes)))
    real = P.step_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            losses["image_mlm"] = losses["image_mlm"] * float("nan")
        return losses

    monkeypatch.setattr(P, "step_losses", poisoned)
    with pytest.raises(FloatingPointError) as info:
        P.run_pretraining(cfg)
    message = str(info.value)
    assert "step 4" in message and "images.jsonl:" in message and "step_00000003" in message


def test_bad_data_over_the_limit_stops_the_run(tmp_path, data_dir):
    bad = tmp_path / "bad.jsonl"
    good = image_text_records(6)
    write_jsonl(bad, good[:2] + ["{broken json"] * 6 + [{"binary": "bm90IGFuIGltYWdl", "desc": "x"}] * 4 + good[2:])
    cfg = run_config(data_dir, tmp_path / "run", steps=4)
    cfg["images"].update(paths=[str(bad)], max_bad_fraction=0.2, bad_check_after=5, shuffle_buffer=1)
    with pytest.raises(BadDataError, match=r"bad\.jsonl:\d+"):
        P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / "c.yaml", cfg)))


def test_pretrained_checkpoint_is_a_model_directory(tmp_path, data_dir):
    from x2vlm.checkpoint import from_pretrained

    out = tmp_path / "run"
    P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / "c.yaml", run_config(data_dir, out, steps=3))))
    model = from_pretrained(S.latest_checkpoint(out))
    assert model.cfg.task == "pretrain" and model.cfg.image_res == 64


def test_fsdp_on_two_cpu_ranks_trains_and_writes_a_full_checkpoint(tmp_path, data_dir):
    """What the CPU can test of FSDP (gloo): sharded training steps and a gathered, loadable checkpoint."""
    from x2vlm.checkpoint import from_pretrained

    out = tmp_path / "fsdp"
    config = write_config(tmp_path / "fsdp.yaml", run_config(data_dir, out, steps=3, ckpt_every=3, parallel="fsdp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "x2vlm.cli", "pretrain", "--config", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = losses_by_step(out)
    assert sorted(losses) == [1, 2, 3] and all(v == v and v < 1e4 for v in losses.values())
    model = from_pretrained(S.latest_checkpoint(out))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (S.latest_checkpoint(out) / "train_state_rank1.pt").exists()


def test_text_tower_stays_fixed_while_frozen_and_trains_after(tmp_path, data_dir):
    from safetensors.torch import load_file

    from x2vlm.config import preset
    from x2vlm.models.x2vlm import X2VLM

    out = tmp_path / "run"
    cfg = run_config(data_dir, out, steps=4, ckpt_every=2, keep_last=3, text_tower_frozen_steps=2, precision="fp32")
    cfg["init"] = "scratch"
    P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / "c.yaml", cfg)))
    start = X2VLM(preset("x2vlm-tiny", task="pretrain", tokenizer=TINY_VOCAB))
    start.load_state_dict(load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors")))
    tower = {n for n, _ in start.named_parameters() if n.startswith(("text_encoder.embeddings.", "text_proj."))}
    tower |= {n for n, _ in start.named_parameters() if any(n.startswith(f"text_encoder.encoder.layer.{i}.") for i in range(start.num_text_layers))}
    assert tower and len([p for p in P.text_tower_parameters(start)]) == len(tower)
    first = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step_00000004" / "model.safetensors"))
    # the random init is seeded, so a fresh scratch run reproduces step 0: frozen weights equal it
    torch.manual_seed(cfg.get("seed", 42))
    init = X2VLM(preset("x2vlm-tiny", task="pretrain", tokenizer=TINY_VOCAB)).state_dict()
    for name in tower:
        assert torch.equal(first[name], init[name]), f"{name} moved while frozen"
    assert any(not torch.equal(first[n], last[n]) for n in tower), "text tower never trained after the frozen steps"
    fusion = f"text_encoder.encoder.layer.{start.num_text_layers}.crossattention.self.query.weight"
    assert not torch.equal(first[fusion], init[fusion]), "fusion layers must train while the tower is frozen"


def test_step_in_backward_trains_exactly_as_a_step_after_backward(tmp_path, data_dir):
    """The same losses and weights with every parameter stepped during backward (text tower held
    fixed for the first two steps in both); grad_clip must be 0 for it, which the run checks first."""
    from safetensors.torch import load_file

    runs = {}
    for name, extra in (("plain", {}), ("hooked", {"step_in_backward": True})):
        out = tmp_path / name
        cfg = run_config(data_dir, out, steps=4, ckpt_every=4, grad_clip=0.0, text_tower_frozen_steps=2, precision="fp32", **extra)
        P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / f"{name}.yaml", cfg)))
        runs[name] = (losses_by_step(out), load_file(str(out / "checkpoints" / "step_00000004" / "model.safetensors")))
    assert runs["plain"][0] == runs["hooked"][0]
    for key, value in runs["plain"][1].items():
        assert torch.equal(value, runs["hooked"][1][key]), key
    clipped = run_config(data_dir, tmp_path / "clipped", steps=1, step_in_backward=True)  # grad_clip 1.0
    with pytest.raises(ValueError, match="step_in_backward.*grad_clip=1.0"):
        P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / "clipped.yaml", clipped)))


def test_same_caption_matches_makes_identical_captions_positives_and_never_negatives(monkeypatch):
    """With ``same_caption_matches`` two rows with the same caption are one text: ITC gets their ids
    (the id-aware loss: positives of each other), ITM never draws one as the other's negative."""
    from x2vlm import objectives as O
    from x2vlm.config import preset
    from x2vlm.data.pretrain import ImageTextBatch
    from x2vlm.models.x2vlm import X2VLM

    texts = torch.tensor([[2, 7, 8, 3, 0], [2, 7, 8, 3, 0], [2, 9, 3, 0, 0], [2, 7, 8, 9, 3], [2, 9, 3, 0, 0]])
    ids = O.caption_ids(texts)
    assert ids[0] == ids[1] and ids[2] == ids[4] and len({ids[0].item(), ids[2].item(), ids[3].item()}) == 3
    assert torch.equal(O.caption_ids(texts[[3, 1]]), ids[[3, 1]])  # a row's id does not depend on its batch

    seen = {"itc": [], "itm": []}
    real_itc, real_neg = O.contrastive_loss, O.sample_negatives
    monkeypatch.setattr(O, "contrastive_loss", lambda *a, ids=None, **k: seen["itc"].append(ids) or real_itc(*a, ids=ids, **k))
    monkeypatch.setattr(O, "sample_negatives", lambda *a, ids=None, **k: seen["itm"].append(ids) or real_neg(*a, ids=ids, **k))
    torch.manual_seed(0)
    model = X2VLM(preset("x2vlm-tiny", task="pretrain")).eval()
    mask = texts.ne(0).long()
    batch = ImageTextBatch(images=torch.randn(5, 3, 64, 64), text_ids=texts, text_mask=mask, masked_ids=texts.clone(),
                           masked_pos=torch.tensor([[1]] * 5), masked_targets=torch.tensor([[7], [7], [9], [7], [9]]),
                           sources=[f"x:{i}" for i in range(5)])
    with torch.no_grad():
        vision, vmask = model.encode_images(batch.images)
        P.aligning_losses(model, vision, vmask, batch, torch.Generator().manual_seed(0), True, same_caption_matches=True)
        P.aligning_losses(model, vision, vmask, batch, torch.Generator().manual_seed(0), True)
        assert torch.equal(seen["itc"][0], ids) and torch.equal(seen["itm"][0], ids)
        assert seen["itc"][1] is None and seen["itm"][1] is None  # off: every other pair is a negative (official)
        vfeat, tfeat = model.vision_features(vision), model.text_features(model.encode_text(texts, mask))
        for seed in range(20):
            image_neg, text_neg = real_neg(vfeat, tfeat, model.temp, ids=ids, generator=torch.Generator().manual_seed(seed))
            assert not ids[image_neg].eq(ids).any() and not ids[text_neg].eq(ids).any()


def test_random_itm_negatives_are_uniform_over_the_non_positives_whatever_the_similarity(tmp_path, data_dir):
    """itm_negatives: random draws each negative uniformly among the pairs that are not positives
    (same index or same caption id), where hard ones follow ITC similarity; the run config selects it
    and rejects anything but hard/random."""
    from x2vlm import objectives as O

    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    feats = torch.nn.functional.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    feats[5] = feats[2]  # row 5 is by far the closest to row 2: the hard sampler nearly always picks it
    counts = {True: torch.zeros(6, 6), False: torch.zeros(6, 6)}
    for hard in (True, False):
        for seed in range(600):
            image_neg, text_neg = O.sample_negatives(feats, feats, torch.tensor(0.02), ids=ids,
                                                     generator=torch.Generator().manual_seed(seed), hard=hard)
            assert not ids[image_neg].eq(ids).any() and not ids[text_neg].eq(ids).any()
            counts[hard][torch.arange(6), text_neg] += 1
    assert counts[True][2, 5] > 550  # hard: the nearest text
    allowed = ~ids.view(-1, 1).eq(ids.view(1, -1))
    expected = 600 / allowed.sum(1, keepdim=True)  # random: 600 draws spread evenly over the allowed
    assert (counts[False][allowed] - expected.expand(6, 6)[allowed]).abs().max() < 60
    out = tmp_path / "run"
    P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / "c.yaml", run_config(data_dir, out, steps=2, itm_negatives="random"))))
    assert losses_by_step(out).keys() == {1, 2}
    with pytest.raises(ValueError, match="itm_negatives must be 'hard' or 'random'"):
        P.load_pretrain_config(write_config(tmp_path / "bad.yaml", run_config(data_dir, out, itm_negatives="easy")))


def test_a_source_without_mlm_trains_itc_and_itm_only(tmp_path, data_dir):
    out = tmp_path / "run"
    cfg = run_config(data_dir, out, steps=2)
    cfg["images"]["mlm"] = False
    P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / "c.yaml", cfg)))
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss_image_itc", "loss_image_itm", "loss_region_mlm", "loss_video_mlm"} <= logged.keys()
    assert "loss_image_mlm" not in logged
    cfg["texts"]["mlm"] = False
    with pytest.raises(ValueError, match="'mlm' is only for image, region and video text sources"):
        P.load_pretrain_config(write_config(tmp_path / "bad.yaml", cfg))


def test_region_texts_are_encoded_once_per_step(tmp_path, data_dir, monkeypatch):
    """The region grain's aligning losses and its box losses share one pass of the text encoder."""
    from x2vlm.models.x2vlm import X2VLM

    calls = []
    real = X2VLM.encode_text
    monkeypatch.setattr(X2VLM, "encode_text", lambda self, *a, **k: calls.append(a[0].shape) or real(self, *a, **k))
    cfg = run_config(data_dir, tmp_path / "run", steps=2, images=None, videos=None, texts=None)
    P.run_pretraining(P.build_pretrain_config(cfg, "test"))
    assert len(calls) == 2


def test_localization_stage_trains_only_the_box_losses_on_frozen_towers(tmp_path, data_dir):
    """``regions.boxes_only`` + ``freeze``: the step's losses are the box losses alone, the towers
    keep their initial weights, the fusion layers and the box head train."""
    from safetensors.torch import load_file

    from x2vlm.config import preset
    from x2vlm.models.x2vlm import X2VLM

    with pytest.raises(ValueError, match="'boxes_only' is only for region_text"):
        P.build_pretrain_config(run_config(data_dir, tmp_path / "bad", images={"paths": ["x.jsonl"], "batch_size": 2, "boxes_only": True}), "t")
    with pytest.raises(ValueError, match="freeze: unknown tower"):
        P.build_pretrain_config(run_config(data_dir, tmp_path / "bad", freeze=["fusion"]), "t")
    out = tmp_path / "run"
    cfg = run_config(data_dir, out, steps=2, ckpt_every=2, images=None, videos=None, texts=None, freeze=["vision", "text"],
                     precision="fp32", init="scratch")
    cfg["regions"]["boxes_only"] = True
    P.run_pretraining(P.build_pretrain_config(cfg, "test"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {k for r in logged for k in r if k.startswith("loss_")} == {"loss_region_bbox", "loss_region_giou"}
    torch.manual_seed(cfg.get("seed", 42))  # the seeded random init of a scratch run
    model = X2VLM(preset("x2vlm-tiny", task="pretrain", tokenizer=TINY_VOCAB))
    init, last = model.state_dict(), load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    towers = [n for n in init if n.startswith(("vision_encoder.", "text_encoder.embeddings.", "text_encoder.encoder.layer.0."))]
    assert towers and all(torch.equal(init[n], last[n]) for n in towers)
    fusion = f"text_encoder.encoder.layer.{model.num_text_layers}.crossattention.self.query.weight"
    assert not torch.equal(init[fusion], last[fusion]) and not torch.equal(init["bbox_head.0.weight"], last["bbox_head.0.weight"])


def test_rows_are_gathered_with_a_deterministic_backward(tmp_path, data_dir, monkeypatch):
    """``x[index]`` sends its gradient back through ``index_put_`` with accumulate, which on CPU adds
    float32 rows from several threads with atomics, in an order that changes from run to run: a
    pre-training run stopped being reproducible bit for bit once the text tower trained (its states
    feed the ITM negatives). Every gather of rows in a training step goes through ``index_select``."""
    from conftest import integer_row_gathers

    real, counts = P.step_losses, []

    def recording(*args, **kwargs):
        losses = real(*args, **kwargs)
        counts.append(integer_row_gathers(sum(losses.values())))
        return losses

    monkeypatch.setattr(P, "step_losses", recording)
    P.run_pretraining(P.build_pretrain_config(run_config(data_dir, tmp_path / "run", steps=1, precision="fp32"), "test"))
    assert counts == [0]


def test_held_out_losses_on_fixed_batches_leave_training_unchanged(tmp_path, data_dir):
    """``eval_every``: every grain's losses on the first ``eval_batches`` batches of its source's
    ``val_paths``, at step 0, every ``eval_every`` steps and at the end (``val_loss_*`` rows; a
    source without held-out files is left out); the evaluation draws nothing from the training's
    random streams, so the training losses are bit-identical to a run without it; asking for it
    without held-out data is a config error."""
    held_out = {name: {**section, "val_paths": section["paths"]}
                for name, section in run_config(data_dir, tmp_path).items() if name in ("images", "regions", "videos")}
    plain_dir, eval_dir = tmp_path / "plain", tmp_path / "eval"
    P.run_pretraining(P.load_pretrain_config(write_config(tmp_path / "plain.yaml", run_config(data_dir, plain_dir, steps=5))))
    P.run_pretraining(P.load_pretrain_config(write_config(
        tmp_path / "eval.yaml", run_config(data_dir, eval_dir, steps=5, eval_every=2, eval_batches=2, **held_out))))

    def records(out_dir):
        return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]

    def training(out_dir):  # the logged training records without the timings
        return [{k: v for k, v in r.items() if k not in ("samples_per_s", "step_time_s", "mfu")} for r in records(out_dir) if "loss" in r]

    assert training(eval_dir) == training(plain_dir)
    held = [r for r in records(eval_dir) if "loss" not in r]
    assert [r["step"] for r in held] == [0, 2, 4, 5]
    expected = {f"val_loss_{grain}_{objective}" for grain in ("image", "region", "video") for objective in ("itc", "itm", "mlm")}
    for r in held:
        assert set(r) == {"step", "val_loss_region_bbox", "val_loss_region_giou"} | expected  # no text_mlm: no val_paths
        assert all(math.isfinite(v) for v in r.values())
    assert held[0] != held[-1]  # the model changed, so did its held-out losses
    with pytest.raises(ValueError, match="needs held-out data: no source has val_paths"):
        P.load_pretrain_config(write_config(tmp_path / "bad.yaml", run_config(data_dir, tmp_path / "bad", eval_every=2)))


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_bf16_training_keeps_weight_casts_only_without_checkpointing(tmp_path, data_dir, monkeypatch, grad_checkpointing):
    """Under activation checkpointing autocast's cache of bf16 weight copies would only hold memory until
    the end of the forward pass (backward recomputes and casts again), so training turns it off."""
    from x2vlm.models.x2vlm import X2VLM

    seen = []
    real = X2VLM.encode_images
    monkeypatch.setattr(X2VLM, "encode_images", lambda self, *a, **k: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_autocast_cache_enabled()))
        or real(self, *a, **k))
    cfg = run_config(data_dir, tmp_path / "run", steps=1, regions=None, videos=None, texts=None, precision="bf16",
                     grad_checkpointing=grad_checkpointing)
    P.run_pretraining(P.build_pretrain_config(cfg, "test"))
    assert seen and set(seen) == {(True, torch.bfloat16, not grad_checkpointing)}
