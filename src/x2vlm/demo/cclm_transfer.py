"""Cross-lingual transfer on the generated world with CCLM adaptation (spec §1.7, §3.1, §3.5).

    python -m x2vlm.demo.cclm_transfer --world runs/demo/world --english runs/demo/pretrain/stage2 \\
        --out /tmp/cclm [--cclm-steps 150] [--en-steps 60] [--few-shot 100 --few-steps 30]

1. ``make_text_encoder``: offline there is no XLM-R, so a SentencePiece model is trained on the
   world's training captions in en/de/fr/es and a *randomly initialised* RoBERTa-style encoder of the
   English model's text width is written in the Hugging Face layout (``config.json``,
   ``model.safetensors``, ``sentencepiece.bpe.model``).
2. ``convert_to_multilingual``: the pre-trained English world model with that text encoder; its
   fusion layers become the separate cross encoder (spec §2.5.4).
3. CCLM adaptation (``x2vlm pretrain``): world image-text in all four languages (one language
   drawn per sample) + parallel text (``x2vlm.world.parallel``) with ITC/ITM/MLM and TTC/TTM/MLM.
4. Retrieval fine-tuning on English only (``x2vlm finetune retrieval``), evaluated on the four test
   languages: en is the supervised language, de/fr/es zero-shot.
5. Few-shot: the English model further fine-tuned on ``--few-shot`` examples per target language
   (plus as many English ones), evaluated again.

``--control`` (ablation: step 4 on the converted model without step 3) and ``--english-baseline``
(reference: step 4 on the English model itself, its WordPiece tokenizer facing de/fr/es) measure what
the adaptation adds.

Writes every run under ``--out`` and ``results.json`` / ``results.md`` with the test ``r_mean`` and
recalls per language next to the random-ranking chance level (``x2vlm.demo.baselines``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml

LANGUAGES = ("en", "de", "fr", "es")
log = logging.getLogger("cclm_transfer")


def make_text_encoder(world: Path, out: Path, hidden: int, layers: int, heads: int, vocab_size: int = 1000,
                      max_tokens: int = 40, seed: int = 0) -> Path:
    """SentencePiece on the world's training captions + a random RoBERTa-style encoder (HF layout)."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    from x2vlm.config import TextConfig
    from x2vlm.models.bert import TextTransformer
    from x2vlm.tokenizer import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    sentences = [e["caption"] for lang in LANGUAGES
                 for e in json.loads((world / "multilingual" / f"coco_{lang}_train.json").read_text(encoding="utf-8"))]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (out / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    vocab = load_tokenizer(out).vocab_size
    positions = max_tokens + 2  # RoBERTa positions start after the pad id (1)
    hf = {"model_type": "xlm-roberta", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
          "num_attention_heads": heads, "intermediate_size": 4 * hidden, "max_position_embeddings": positions,
          "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
          "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    cfg = TextConfig(vocab_size=vocab, hidden_size=hidden, num_heads=heads, intermediate_size=4 * hidden,
                     max_position_embeddings=positions, type_vocab_size=1, layer_norm_eps=1e-5, num_layers=layers,
                     fusion_start=layers, position_style="roberta", pad_token_id=1, cls_token_id=0, sep_token_id=2,
                     unk_token_id=3, mask_token_id=vocab - 1)
    torch.manual_seed(seed)
    encoder = TextTransformer(cfg, layers, cross_start=layers, cross_width=hidden)
    for name, module in encoder.named_modules():  # BERT initialisation, as Hugging Face's
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
    save_file({f"roberta.{k}": v.contiguous() for k, v in encoder.state_dict().items()}, str(out / "model.safetensors"))
    return out


def convert(english: Path, text_dir: Path, out: Path) -> Path:
    from x2vlm.checkpoint import convert_to_multilingual, save_pretrained
    from x2vlm.tokenizer import load_tokenizer

    model, new = convert_to_multilingual(english, text_dir)
    log.info("converted %s (new: %s)", english, new)
    save_pretrained(model, out, tokenizer_files=load_tokenizer(text_dir).files)
    return out


def cclm_config(world: Path, data: Path, model_dir: Path, out: Path, steps: int) -> dict:
    """The small-world CCLM adaptation (as ``configs/pretrain/cclm_small_world.yaml``) on our paths."""
    base = yaml.safe_load((Path(__file__).parents[1] / "configs" / "pretrain" / "cclm_small_world.yaml").read_text())
    base.update(model=str(model_dir / "config.json"), init=f"ours:{model_dir}", steps=steps, out_dir=str(out),
                ckpt_every=steps, tensorboard=False)
    base["images"].update(paths=[str(data / "image_text")], image_root=str(world / "images"))
    base["mtexts"].update(paths=[str(data / "parallel_text")])
    return base


def retrieval_config(world: Path, init: Path, out: Path, steps: int, train_files: list[str], batch_size: int) -> dict:
    from x2vlm.checkpoint import resolve_model_dir

    ml = world / "multilingual"
    init = resolve_model_dir(init)  # a pre-training run's latest checkpoint
    return {
        "task": "retrieval", "model": str(init),
        "init": f"ours:{init}",
        "data": {"train_files": train_files, "val_file": {"en": str(ml / "coco_en_val.json")},
                 "test_file": {lang: str(ml / f"coco_{lang}_test.json") for lang in LANGUAGES},
                 "image_root": str(world / "images"), "max_tokens": 30, "k_test": 8,
                 "crop_scale": [1.0, 1.0], "randaug": False, "hflip": "swap"},
        "optimizer": {"lr": 1.0e-4, "weight_decay": 0.01, "lr_mult": 2.0},
        "schedule": {"warmup": 0.1}, "max_steps": steps, "batch_size": batch_size, "eval_batch_size": 64,
        "eval_every": None, "out_dir": str(out), "log_every": 5, "tensorboard": False, "seed": 0,
    }


def run_cli(args: list[str]) -> None:
    from x2vlm.cli import main

    started = time.perf_counter()
    code = main(args)
    if code != 0:
        raise SystemExit(f"x2vlm {' '.join(args)} exited with {code}")
    log.info("%s: %.0f s", args[:2], time.perf_counter() - started)


def few_shot_file(world: Path, out: Path, count: int) -> list[str]:
    files = []
    for lang in LANGUAGES:
        entries = json.loads((world / "multilingual" / f"coco_{lang}_train.json").read_text(encoding="utf-8"))
        path = out / f"few_{lang}.json"
        path.write_text(json.dumps(entries[-count:], ensure_ascii=False), encoding="utf-8")  # the last entries: unseen by step 4's first ones
        files.append(str(path))
    return files


def test_metrics(run: Path) -> dict[str, float]:
    return json.loads((run / "metrics.json").read_text())["results"]["test"]


def transfer(world: Path, english: Path, out: Path, *, cclm_steps: int, en_steps: int, batch_size: int = 16, text_layers: int = 4,
             vocab_size: int = 1000, control: bool = True, few_shot: int = 0, few_steps: int = 0, seed: int = 0,
             changes: dict | None = None) -> dict:
    """Steps 1-4 in this process (the demo's ``multilingual`` stage): text encoder, conversion, world
    data, ``cclm_steps`` of CCLM adaptation, ``en_steps`` of English retrieval fine-tuning evaluated on
    the four test languages; with ``control`` also the same fine-tuning of the converted model without
    CCLM; with ``few_shot`` > 0 step 5, ``few_steps`` more of fine-tuning on ``few_shot`` captions per
    language (``few_shot_file``), evaluated again. ``changes`` (e.g. ``precision``, ``tensorboard``) go into every run config.

    Resumable: finished preparation steps are kept (``out/prepared.json``) and a finished run is not
    trained again (its checkpoint is found and it is only re-evaluated); a run cut short restarts, as
    its only checkpoint is written at its end. Returns the test metrics (``zero_shot``, ``control``,
    ``few_shot``), the random-ranking
    chance level, the data counts, the seconds of each step and the configs written."""
    from x2vlm.checkpoint import resolve_model_dir
    from x2vlm.config import X2VLMConfig
    from x2vlm.demo.baselines import retrieval_chance
    from x2vlm.train.finetune import build_finetune_config, run_finetuning
    from x2vlm.train.finetune import config_to_yaml as finetune_yaml
    from x2vlm.train.pretrain import build_pretrain_config, config_to_yaml, run_pretraining
    from x2vlm.world.parallel import write_cclm_world_data

    out.mkdir(parents=True, exist_ok=True)
    changes = dict(changes or {})
    timings: dict[str, float] = {}
    configs: dict[str, str] = {}
    prepared = out / "prepared.json"
    t = time.perf_counter()
    if prepared.exists():
        counts = json.loads(prepared.read_text())["data"]
    else:
        english_cfg = X2VLMConfig.load(resolve_model_dir(english) / "config.json")
        text = english_cfg.text
        text_dir = make_text_encoder(world, out / "text_encoder", text.hidden_size, text_layers, text.num_heads,
                                     vocab_size=vocab_size, seed=seed)
        convert(english, text_dir, out / "converted")
        counts = write_cclm_world_data(world, out / "data")
        prepared.write_text(json.dumps({"data": counts}))
    timings["prepare_s"] = time.perf_counter() - t
    converted = out / "converted"
    en_train = [str(world / "multilingual" / "coco_en_train.json")]

    def finetune(name: str, init: Path, steps: int = en_steps, train_files: list[str] = en_train) -> dict:
        started = time.perf_counter()
        data = {**retrieval_config(world, init, out / name, steps, train_files, batch_size), "seed": seed, **changes}
        cfg = build_finetune_config(data, f"multilingual {name}")
        configs[name] = str(out / f"{name}.yaml")
        Path(configs[name]).write_text(finetune_yaml(cfg))
        summary = run_finetuning(cfg)
        timings[f"{name}_s"] = time.perf_counter() - started
        return summary["results"]["test"]

    t = time.perf_counter()
    data = cclm_config(world, out / "data", converted, out / "cclm", cclm_steps)
    for section in ("images", "mtexts"):
        data[section]["batch_size"] = batch_size
    data.update(seed=seed, **changes)
    cfg = build_pretrain_config(data, "multilingual cclm")
    configs["cclm"] = str(out / "cclm.yaml")
    Path(configs["cclm"]).write_text(config_to_yaml(cfg))
    run_pretraining(cfg)
    timings["cclm_s"] = time.perf_counter() - t
    results = {"zero_shot": finetune("retrieval_en", out / "cclm")}
    if control:
        results["control"] = finetune("retrieval_en_no_cclm", converted)
    if few_shot:
        results["few_shot"] = finetune("retrieval_few", out / "retrieval_en" / "best", few_steps, few_shot_file(world, out, few_shot))
    ml = world / "multilingual"
    chance = retrieval_chance({"val_file": str(ml / "coco_en_val.json"), "test_file": str(ml / "coco_en_test.json"),
                               "image_root": str(world / "images"), "max_tokens": 30, "k_test": 8}, ["test"])["test"]
    return {"out_dir": str(out), "config": configs["cclm"], "configs": configs, "data": counts, "timings": timings,
            "chance": chance, **results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="runs/demo/world")
    p.add_argument("--english", default="runs/demo/pretrain/stage2", help="pre-trained English world model (our run or model dir)")
    p.add_argument("--out", default="/tmp/cclm")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--cclm-steps", type=int, default=150)
    p.add_argument("--en-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--few-shot", type=int, default=100, help="training captions per language for step 5 (0: skip)")
    p.add_argument("--few-steps", type=int, default=30)
    p.add_argument("--control", action="store_true", help="also fine-tune the converted model without CCLM adaptation")
    p.add_argument("--english-baseline", action="store_true",
                   help="reference instead: fine-tune the English model itself (its WordPiece text encoder) on English, evaluate every language")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    world, out = Path(args.world), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.english_baseline:
        run = out / "retrieval_english_model"
        shutil.rmtree(run, ignore_errors=True)
        cfg_path = out / "retrieval_english_model.yaml"
        cfg_path.write_text(yaml.safe_dump(retrieval_config(world, Path(args.english), run, args.en_steps,
                                                            [str(world / "multilingual" / "coco_en_train.json")], args.batch_size)))
        run_cli(["finetune", "retrieval", "--config", str(cfg_path)])
        (out / "results.json").write_text(json.dumps({"settings": vars(args), "results": {"english_model": test_metrics(run)}}, indent=1))
        return 0
    summary = transfer(world, Path(args.english), out, cclm_steps=args.cclm_steps, en_steps=args.en_steps, batch_size=args.batch_size,
                       text_layers=args.text_layers, control=args.control, few_shot=args.few_shot, few_steps=args.few_steps)
    (out / "results.json").write_text(json.dumps({"settings": vars(args), **summary}, indent=1))
    keys = ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")
    lines = ["| setting | language | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name in ("zero_shot", "control", "few_shot"):
        for lang in LANGUAGES if name in summary else ():
            lines.append(f"| {name} | {lang} | " + " | ".join(f"{summary[name][f'{lang}/{k}']:.1f}" for k in keys) + " |")
    lines.append("| chance | any | " + " | ".join(f"{summary['chance'][k]:.1f}" for k in keys) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
