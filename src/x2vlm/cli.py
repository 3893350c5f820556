"""Command line: ``x2vlm <command>``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("x2vlm")


def _load_config_file(path: Path, task: str | None):
    from x2vlm.config import X2VLMConfig, from_official_yaml

    if path.suffix in (".yaml", ".yml"):
        import yaml

        from x2vlm.config import load_yaml

        try:
            data = load_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from err
        return from_official_yaml(data, task=task), True
    return X2VLMConfig.load(path), False


def cmd_convert(args: argparse.Namespace) -> int:
    """Official checkpoint -> our directory (config.json, model.safetensors, tokenizer files); with
    ``--text-encoder`` the multilingual (separate cross encoder) model initialised from it."""
    from x2vlm.checkpoint import cclm_config, infer_config, is_cclm_state, load_official, official_to_native, read_state_dict, save_pretrained
    from x2vlm.config import preset
    from x2vlm.models.x2vlm import X2VLM
    from x2vlm.tokenizer import load_tokenizer

    state = read_state_dict(args.src, allow_unsafe_pickle=args.allow_unsafe_pickle)
    cclm = is_cclm_state(official_to_native(state)[0])
    if args.config:
        cfg, explicit = _load_config_file(Path(args.config), args.task)
        if cclm and not cfg.cross_num_layers:  # an X²-VLM config: the text encoder's comes from --text-encoder
            cfg = cclm_config(state, cfg, args.text_encoder)
        elif not explicit:
            cfg = infer_config(state, cfg)
    elif cclm:  # a released CCLM / XVLMPlus file: its own layout, text encoder config from --text-encoder
        cfg = cclm_config(state, preset(args.preset), args.text_encoder)
    else:
        cfg = infer_config(state, preset(args.preset))
    changes = {k: v for k, v in (("task", args.task), ("image_res", args.image_res)) if v is not None}
    if changes:
        cfg = cfg.replace(**changes)
    model = X2VLM(cfg)
    new = load_official(model, state)
    if new:
        log.warning("newly initialised (not in the checkpoint): %s", ", ".join(new))
    if cclm:  # already multilingual: the tokenizer is the text encoder's
        tokenizer = load_tokenizer(args.tokenizer or args.text_encoder or cfg.tokenizer)
    elif args.text_encoder:  # X²-VLM -> multilingual: new text encoder, fusion layers -> cross encoder
        from x2vlm.checkpoint import convert_to_multilingual

        model, new = convert_to_multilingual(model, args.text_encoder)
        if new:
            log.warning("newly initialised (not in the checkpoint): %s", ", ".join(new))
        tokenizer = load_tokenizer(args.tokenizer or args.text_encoder)
        cfg = model.cfg
    else:
        tokenizer = load_tokenizer(args.tokenizer or cfg.tokenizer)
    out = Path(args.out_dir)
    save_pretrained(model, out, tokenizer_files=tokenizer.files)
    log.info("wrote %s (task %s, image_res %d, %s)", out, cfg.task, cfg.image_res, cfg.name)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from x2vlm.train.pretrain import load_pretrain_config, run_pretraining

    cfg = load_pretrain_config(args.config, args.set)
    run_pretraining(cfg, resume=args.resume)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from x2vlm.train.finetune import load_finetune_config, run_finetuning

    cfg = load_finetune_config(args.config, args.set, task=args.task)
    run_finetuning(cfg, resume=args.resume)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from x2vlm.checkpoint import resolve_trained_model_dir
    from x2vlm.train.finetune import load_finetune_config, run_evaluation

    cfg = load_finetune_config(args.config, args.set, task=args.task)
    checkpoint = resolve_trained_model_dir(args.checkpoint)
    results = run_evaluation(cfg, checkpoint, args.out_dir)
    print(json.dumps(results, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """World -> three-stage pre-training -> every task, pre-trained and from scratch -> table and report."""
    from x2vlm.demo import DemoSettings, run_demo

    from x2vlm.demo.run import MultilingualBudget

    settings = DemoSettings(out_dir=Path(args.out), size=args.size, seed=args.seed, ablation=args.ablation,
                            multilingual=args.multilingual or args.multilingual_control,
                            multilingual_budget=MultilingualBudget(control=args.multilingual_control),
                            pretrain_overrides=args.set_pretrain, finetune_overrides=args.set_finetune)
    table = run_demo(settings)
    print(table)
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def cmd_convert_vqa(args: argparse.Namespace) -> int:
    """Official VQA v2 question (+ annotation) files -> the processed json ``x2vlm finetune vqa`` reads."""
    from x2vlm.tasks.vqa import convert_vqa_official

    kwargs = {"image_template": args.image_template} if args.image_template else {}
    count = convert_vqa_official(args.questions, args.annotations, args.out, args.image_prefix, **kwargs)
    log.info("%d questions -> %s", count, args.out)
    return 0


def cmd_convert_marvl(args: argparse.Namespace) -> int:
    """IGLUE MaRVL JSON lines -> the NLVR2 json ``x2vlm finetune nlvr`` evaluates (one per language)."""
    from x2vlm.tasks.nlvr import convert_marvl

    counts = convert_marvl(args.src, args.out, "fewshot" if args.fewshot else "official", args.root, args.language)
    log.info("%s -> %s", ", ".join(f"{lang}: {n} statements" for lang, n in counts.items()), args.out)
    return 0


def cmd_evaluate_retrieval(args: argparse.Namespace) -> int:
    """Zero-shot or fine-tuned retrieval recalls of a model directory on a Karpathy-style file."""
    import json

    import torch

    from x2vlm.checkpoint import from_pretrained
    from x2vlm.checkpoint import resolve_model_dir
    from x2vlm.tasks.retrieval import evaluate_retrieval, load_retrieval_split
    from x2vlm.tokenizer import model_tokenizer

    torch.manual_seed(0)
    checkpoint = resolve_model_dir(args.checkpoint)
    model = from_pretrained(checkpoint)
    tokenizer = model_tokenizer(checkpoint, model.cfg.tokenizer)
    split = load_retrieval_split(args.data, args.image_root, model.cfg.image_res, tokenizer, args.max_tokens,
                                 frame_len=model.cfg.frame_len if args.video else 0)
    results = evaluate_retrieval(model, split.pixels, split.text_ids, split.text_mask, split.img2txt, split.txt2img,
                                 k_test=args.k_test, itm="itm" in model.cfg.heads)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x2vlm", description="X²-VLM: pre-training, fine-tuning, evaluation and inference")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an official .th/.pth/.safetensors checkpoint to an x2vlm directory")
    p.add_argument("src", help="official checkpoint file")
    p.add_argument("out_dir", help="output directory (config.json, model.safetensors, vocab.txt)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="architecture preset (x2vlm-base, x2vlm-large, ...); task, image size and frames are read off the checkpoint")
    group.add_argument("--config", help="an official YAML or our config.json")
    p.add_argument("--task", help="override the task (pretrain, retrieval, grounding, nlvr, classification, vqa, captioning)")
    p.add_argument("--image-res", type=int, help="build the model at this resolution (relative-position tables are resized)")
    p.add_argument("--tokenizer", help="tokenizer: vocabulary name or file, tokenizer.json, .model or directory (default: the config's)")
    p.add_argument("--text-encoder", metavar="HF_DIR",
                   help="replace the text encoder with the Hugging Face RoBERTa/XLM-R/BERT model in HF_DIR; the fusion layers "
                        "become a separate cross encoder (X²-VLM -> multilingual, as CCLM initialises from X²-VLM); for a released "
                        "CCLM / XVLMPlus checkpoint: the text encoder it was trained with (its config and tokenizer)")
    p.add_argument("--allow-unsafe-pickle", action="store_true", help="allow full unpickling for files that need it (runs code from the file: trusted files only)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("pretrain", help="pre-train (one process, or under torchrun for DDP/FSDP)")
    p.add_argument("--config", help="run config YAML (see src/x2vlm/configs/pretrain)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. optimizer.lr=3e-4 (repeatable)")
    p.add_argument("--resume", help="checkpoint directory (or run directory: its latest checkpoint) to continue from exactly")
    p.set_defaults(func=cmd_pretrain)

    from x2vlm.train.finetune import TASK_MODULES

    p = sub.add_parser("finetune", help="fine-tune a task; selects on validation, evaluates the test splits once at the end")
    p.add_argument("task", choices=sorted(TASK_MODULES))
    p.add_argument("--config", required=True, help="run config YAML (see src/x2vlm/configs/finetune)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--resume", help="checkpoint or run directory to continue from exactly (default: the run's latest)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a model directory on every split of a task config")
    p.add_argument("task", choices=sorted(TASK_MODULES))
    p.add_argument("--checkpoint", required=True, help="an x2vlm model directory (or a run directory: its best/ or latest)")
    p.add_argument("--config", required=True, help="the task's run config YAML (its data section is used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out-dir", help="where metrics and prediction files go (default: the config's out_dir)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the main job: generate the world, pre-train, fine-tune every task, print the paper's table")
    p.add_argument("--out", default="runs/demo", help="directory for everything the demo writes (default runs/demo); a re-run continues there")
    p.add_argument("--size", default="small", choices=["small", "medium"], help="world size (default small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of every run (default 0)")
    p.add_argument("--ablation", action="store_true", help="also pre-train without region-text data and box losses and compare")
    p.add_argument("--multilingual", action="store_true",
                   help="also CCLM-adapt the pre-trained model to de/fr/es, fine-tune retrieval on English only and test every "
                        "language (zero-shot cross-lingual transfer; about 7 more minutes at size small)")
    p.add_argument("--multilingual-control", action="store_true",
                   help="--multilingual plus the control: the same English fine-tuning without CCLM (about 2-3 minutes more); "
                        "only on the run that performs the multilingual stage")
    p.add_argument("--set-pretrain", action="append", default=[], metavar="KEY=VALUE", help="override a field of both pre-training configs")
    p.add_argument("--set-finetune", action="append", default=[], metavar="KEY=VALUE", help="override a field of every fine-tuning config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert-vqa", help="official VQA v2 question/annotation files -> the processed json the VQA task reads")
    p.add_argument("questions", help="e.g. v2_OpenEnded_mscoco_train2014_questions.json")
    p.add_argument("out", help="processed json to write")
    p.add_argument("--annotations", help="e.g. v2_mscoco_train2014_annotations.json (omit for test-dev: no answers)")
    p.add_argument("--image-prefix", default="", help="prepended to every image path")
    p.add_argument("--image-template", help="image file name template (default: COCO naming from data_subtype and image_id)")
    p.set_defaults(func=cmd_convert_vqa)

    p = sub.add_parser("convert-marvl", help="IGLUE MaRVL JSON lines -> the NLVR2 json the nlvr task evaluates (MaRVL)")
    p.add_argument("src", help="e.g. marvl-id.jsonl (caption, label, left_img, right_img, language, concept)")
    p.add_argument("out", help="NLVR2-style json to write")
    p.add_argument("--fewshot", action="store_true",
                   help="few-shot layout: images under ROOT/marvl_fewshot/<lang>/all/ (default: ROOT/marvl_official/<lang>/images/<concept>/)")
    p.add_argument("--root", default="images", help="the folder holding marvl_official/ and marvl_fewshot/ (default images)")
    p.add_argument("--language", help="check that every record is of this language")
    p.set_defaults(func=cmd_convert_marvl)

    p = sub.add_parser("evaluate-retrieval", help="retrieval recalls (ITC, ITM re-ranked, ITM+ITC) of a model directory")
    p.add_argument("--checkpoint", required=True, help="an x2vlm model directory, or a run directory (its latest checkpoint)")
    p.add_argument("--data", required=True, help="Karpathy-style evaluation json ([{image, caption: [...]}])")
    p.add_argument("--image-root", required=True, help="folder the image (or video) paths are relative to")
    p.add_argument("--k-test", type=int, default=16, help="candidates re-ranked by ITM per query")
    p.add_argument("--max-tokens", type=int, default=30)
    p.add_argument("--video", action="store_true", help="the items are videos (MSR-VTT style, key 'video')")
    p.add_argument("--out", help="write the metrics json here")
    p.set_defaults(func=cmd_evaluate_retrieval)

    from x2vlm.predict_cli import add_predict_command

    add_predict_command(sub)

    from x2vlm.world import add_world_commands

    add_world_commands(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from x2vlm.train.host_memory import reuse_freed_memory

    reuse_freed_memory()  # every step reuses its memory instead of faulting it in again (host_memory says why)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
