"""``x2vlm predict vqa|ground|caption|match|retrieve``: the inference API (``x2vlm.inference``) on the
command line. Each command loads a model directory (or a run directory), runs one ``Model`` method and
prints one JSON document on stdout; ``--draw OUT.png`` (vqa, ground, caption) writes the image, at its
own size, with the answer, the box or the caption drawn on it. User errors (an unreadable image, a
model of another task, a bad device or dtype) are ``ValueError``/``FileNotFoundError``: the command
line prints them on one line and exits with status 2."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

# -- the parser -------------------------------------------------------------------------------------------
RETRIEVE_EPILOG = """\
a text query (--text) ranks an image gallery: --gallery IMG [IMG ...] (image files, embedded now;
add --videos for video files) or --gallery INDEX_DIR (an index saved before with --save-index).
an image query (--image) ranks a text gallery: --texts T [T ...] and/or --texts-file FILE (one text a
line), or --gallery INDEX_DIR of a text index. Hits are ranked as the retrieval evaluation ranks: the
--k-test best by ITC re-ranked by the ITM logit (itm null beyond them); 'item' is the hit's file or text.
"""


def add_predict_command(sub) -> None:
    """``predict`` and its sub-commands on the ``x2vlm`` parser's sub-parsers ``sub``."""
    predict = sub.add_parser("predict", help="run a trained model on your images or texts; prints JSON",
                             description="Run a trained model (an x2vlm model directory or a fine-tuning run directory) "
                                         "on images, videos and texts; each command prints one JSON document.")
    tasks = predict.add_subparsers(dest="predict_command", required=True, metavar="{vqa,ground,caption,match,retrieve}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, metavar="PATH",
                       help="an x2vlm model directory, a run directory (its best/, else its latest checkpoint), "
                            "or an official checkpoint file (with --preset)")
        p.add_argument("--preset", help="an official checkpoint's architecture, e.g. x2vlm-base (needed for a file)")
        p.add_argument("--task", help="an official pre-training checkpoint used for this task (e.g. retrieval)")
        p.add_argument("--tokenizer", metavar="PATH", help="vocabulary / tokenizer when the model has none of its own")
        p.add_argument("--allow-unsafe-pickle", action="store_true",
                       help="read official files that pickle Python objects besides tensors (only files you trust)")
        p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
        p.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16 (bfloat16 autocast, cpu or cuda)")
        p.add_argument("--batch-size", type=int, default=64, metavar="N", help="items per forward pass (default 64)")

    p = tasks.add_parser("vqa", help="answer a question about an image (VQA model) or a video (video-QA model)",
                         description="Answer a question: a VQA model ranks its answer list as the VQA evaluation does; "
                                     "a video-QA model (task classification) takes its classifier's top answers.")
    common(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="IMG", help="image file")
    source.add_argument("--video", metavar="VIDEO", help="video file (a video-QA model)")
    p.add_argument("--question", required=True, metavar="Q")
    p.add_argument("--top-k", type=int, metavar="N",
                   help="answers listed with their probabilities (default 5, or fewer if the model ranks fewer)")
    p.add_argument("--k-test", type=int, metavar="N", help="VQA: answers re-ranked by likelihood (default: the fine-tuning's)")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with the question and answer drawn on it")
    p.set_defaults(func=cmd_vqa)

    p = tasks.add_parser("ground", help="the box [x, y, w, h] (pixels) of the region an expression refers to",
                         description="Find the region a referring expression describes (a grounding or pre-training model).")
    common(p)
    p.add_argument("--image", required=True, metavar="IMG")
    p.add_argument("--expression", required=True, metavar="TEXT")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with the box and the expression drawn on it")
    p.set_defaults(func=cmd_ground)

    p = tasks.add_parser("caption", help="caption an image (captioning model)",
                         description="Caption an image as the captioning evaluation decodes (its saved settings and prompt).")
    common(p)
    p.add_argument("--image", required=True, metavar="IMG")
    p.add_argument("--beams", type=int, metavar="N", help="beam search with N beams (default: the fine-tuning's decoding)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding")
    p.add_argument("--max-length", type=int, metavar="N", help="at most N new tokens")
    p.add_argument("--min-length", type=int, metavar="N", help="at least N new tokens")
    p.add_argument("--draw", metavar="OUT.png", help="write the image with the caption drawn on it")
    p.set_defaults(func=cmd_caption)

    p = tasks.add_parser("verify", help="is a statement true of a pair of images (NLVR2 model)",
                         description="Judge a statement about two images as the NLVR2 evaluation does (true / false and "
                                     "the probability of true).")
    common(p)
    p.add_argument("--left", required=True, metavar="IMG", help="the left image")
    p.add_argument("--right", required=True, metavar="IMG", help="the right image")
    p.add_argument("--statement", required=True, metavar="TEXT")
    p.set_defaults(func=cmd_verify)

    p = tasks.add_parser("entail", help="entailment, contradiction or neutral for an image and a hypothesis (XVNLI model)",
                         description="Classify a hypothesis against an image as the XVNLI evaluation does (the three labels "
                                     "with their probabilities).")
    common(p)
    p.add_argument("--image", required=True, metavar="IMG")
    p.add_argument("--hypothesis", required=True, metavar="TEXT")
    p.set_defaults(func=cmd_entail)

    p = tasks.add_parser("match", help="ITM and ITC scores of every image with every text",
                         description="Image-text scores as the retrieval evaluation computes them: 'itm' the ITM match "
                                     "logit, 'itc' the cosine similarity of the contrastive features; matrices "
                                     "[image][text] (a retrieval or pre-training model).")
    common(p)
    p.add_argument("--image", required=True, nargs="+", metavar="IMG", help="image files (video files with --video)")
    p.add_argument("--text", required=True, nargs="+", metavar="T")
    p.add_argument("--video", action="store_true", help="the --image files are videos (a video retrieval model)")
    p.set_defaults(func=cmd_match)

    p = tasks.add_parser("retrieve", help="rank a gallery: images (or videos) for a text, texts for an image",
                         description="Retrieve the k best gallery items for a query (a retrieval or pre-training model).",
                         epilog=RETRIEVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    common(p)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", metavar="Q", help="a text query: ranks an image (or video) gallery")
    query.add_argument("--image", metavar="IMG", help="an image query: ranks a text gallery")
    p.add_argument("--gallery", nargs="+", metavar="PATH",
                   help="a saved index directory, or image files (video files with --videos) for a text query")
    p.add_argument("--videos", action="store_true", help="the --gallery files are videos (a video retrieval model)")
    p.add_argument("--texts", nargs="+", metavar="T", help="the text gallery of an image query")
    p.add_argument("--texts-file", metavar="FILE", help="the text gallery of an image query, one text a line")
    p.add_argument("--k", type=int, default=10, metavar="N", help="hits to list (default 10)")
    p.add_argument("--k-test", type=int, metavar="N",
                   help="ITC candidates re-ranked by ITM (default: the fine-tuning's; 0: ITC only)")
    p.add_argument("--save-index", metavar="DIR", help="save the gallery embedded from files or texts as an index here")
    p.add_argument("--keep-embeddings", choices=("fp32", "bf16"),
                   help="store the gallery images' vision embeddings in the index (fp32, or bf16 at half the size), so "
                        "that queries re-rank without encoding the candidate files again")
    p.set_defaults(func=cmd_retrieve)


# -- the commands ---------------------------------------------------------------------------------------
def _load(args: argparse.Namespace):
    from x2vlm.inference import load

    return load(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, preset=args.preset,
                task=args.task, tokenizer=args.tokenizer, allow_unsafe_pickle=args.allow_unsafe_pickle)


def _print(document: dict[str, Any]) -> int:
    print(json.dumps(document, indent=2))
    return 0


def _default_top_k(model, k_test: int | None) -> int:
    """5, or the number of answers the model ranks if fewer."""
    if model.task == "vqa":
        limit = min(model.vqa_settings(k_test).k_test, len(model.answer_list()))
    elif model.task == "classification" and model.cfg.frame_len > 0:
        limit = len(model.label_names())
    else:
        limit = 5  # answer() raises the task mismatch
    return min(5, limit)


def cmd_vqa(args: argparse.Namespace) -> int:
    model = _load(args)
    item = args.image if args.image is not None else args.video
    if args.draw and args.video is not None:
        raise ValueError("--draw draws on an image; it is not available with --video")
    top_k = args.top_k if args.top_k is not None else _default_top_k(model, args.k_test)
    answer = model.answer(item, args.question, top_k=top_k, k_test=args.k_test)
    document = {"image" if args.image is not None else "video": item, "question": args.question, **answer.to_dict()}
    if args.draw:
        lines = [f"A: {answer.answer} ({answer.probability:.2f})", f"Q: {args.question}"]  # the answer first: a small image cuts the rest
        document["drawn"] = _save(draw_on_image(args.image, lines), args.draw)
    return _print(document)


def cmd_ground(args: argparse.Namespace) -> int:
    model = _load(args)
    box = model.ground(args.image, args.expression)
    document = {"image": args.image, "expression": args.expression, "box": box}
    if args.draw:
        document["drawn"] = _save(draw_on_image(args.image, [args.expression], box=box), args.draw)
    return _print(document)


def cmd_caption(args: argparse.Namespace) -> int:
    model = _load(args)
    caption = model.caption(args.image, beams=args.beams, max_length=args.max_length, min_length=args.min_length,
                            greedy=True if args.greedy else None)
    document = {"image": args.image, "caption": caption}
    if args.draw:
        document["drawn"] = _save(draw_on_image(args.image, [caption]), args.draw)
    return _print(document)


def cmd_verify(args: argparse.Namespace) -> int:
    verdict = _load(args).verify(args.left, args.right, args.statement)
    return _print({"left": args.left, "right": args.right, "statement": args.statement, **verdict.to_dict()})


def cmd_entail(args: argparse.Namespace) -> int:
    answer = _load(args).entail(args.image, args.hypothesis)
    return _print({"image": args.image, "hypothesis": args.hypothesis, **answer.to_dict()})


def cmd_match(args: argparse.Namespace) -> int:
    model = _load(args)
    scores = model.match(list(args.image), list(args.text), video=args.video)  # lists: always (I, T) matrices
    return _print({"videos" if args.video else "images": args.image, "texts": args.text,
                   "itm": scores["itm"].tolist(), "itc": scores["itc"].tolist()})


def _read_texts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"texts file not found: {file}")
    texts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{file}: no texts (one text a line)")
    return texts


def _gallery(model, args: argparse.Namespace):
    """(GalleryIndex, where it was loaded from or None) for the query kind of ``args``."""
    from x2vlm.inference import INDEX_JSON, GalleryIndex

    text_query = args.text is not None
    texts = list(args.texts or []) + (_read_texts(args.texts_file) if args.texts_file else [])
    given = args.gallery or []
    saved_index = len(given) == 1 and Path(given[0]).is_dir()
    if args.keep_embeddings and (saved_index or not text_query):
        raise ValueError("--keep-embeddings stores the vision embeddings of an image (or video) gallery embedded from files")
    if saved_index:
        if texts:
            raise ValueError("give the gallery either as a saved index (--gallery DIR) or as texts, not both")
        if not (Path(given[0]) / INDEX_JSON).is_file():
            raise FileNotFoundError(f"{given[0]}: a directory but not a gallery index (saved with --save-index)")
        index = GalleryIndex.load(given[0])
        wanted = "an image or video index" if text_query else "a text index"
        if (index.kind == "texts") == text_query:
            raise ValueError(f"a {'text' if text_query else 'image'} query needs {wanted}; {given[0]} is an index of {index.kind}")
        return index, given[0]
    if text_query:
        if texts:
            raise ValueError("--texts/--texts-file give the gallery of an image query (--image); a text query ranks "
                             "--gallery image (or video) files or a saved index")
        if not given:
            raise ValueError("a text query needs --gallery: image files (video files with --videos) or a saved index directory")
        keep = {"keep_embeddings": True, "embeddings_dtype": args.keep_embeddings} if args.keep_embeddings else {}
        return model.index(given, kind="videos" if args.videos else "images", ids=given, out=args.save_index, **keep), None
    if given:
        raise ValueError("an image query ranks texts: give them with --texts/--texts-file, or --gallery a saved text index")
    if not texts:
        raise ValueError("an image query needs a text gallery: --texts T [T ...], --texts-file FILE or --gallery a saved text index")
    return model.index(texts, kind="texts", out=args.save_index), None


def cmd_retrieve(args: argparse.Namespace) -> int:
    model = _load(args)
    if args.videos and args.text is None:
        raise ValueError("--videos describes the --gallery files of a text query")
    if args.save_index and args.gallery and len(args.gallery) == 1 and Path(args.gallery[0]).is_dir():
        raise ValueError("--save-index saves a gallery embedded from files or texts, not one loaded from an index")
    index, loaded_from = _gallery(model, args)  # with --save-index written there as it is embedded (resumable)
    hits = model.retrieve(args.text if args.text is not None else args.image, index, k=args.k, k_test=args.k_test)
    document: dict[str, Any] = {
        "query": {"text": args.text} if args.text is not None else {"image": args.image},
        "gallery": {"kind": index.kind, "size": len(index), "index": loaded_from},
        "hits": [{**hit.to_dict(), "item": index.sources[hit.index]} for hit in hits],
    }
    if args.save_index:
        document["saved_index"] = args.save_index
    return _print(document)


# -- pictures -------------------------------------------------------------------------------------------
BOX_WIDTH = 2


def draw_on_image(image, lines: list[str], box: list[float] | None = None):
    """The image (any ``inference.read_image`` input) at its own size, with ``box`` ``[x, y, w, h]``
    outlined (``world.show.draw_boxes``, magenta) and ``lines`` written on a dark band at the bottom
    (wrapped to the width; on a small image the text is cut)."""
    from PIL import Image, ImageDraw

    from x2vlm.inference import read_image
    from x2vlm.world.show import draw_boxes, font

    picture = read_image(image).copy()
    if box is not None:
        x, y, w, h = box
        picture = draw_boxes(picture, [((x, y, max(w, 1.0), max(h, 1.0)), "")], 1)  # scale 1: the image's size
    face = font()
    left, top, right, bottom = face.getbbox("Ag")
    char_width, line_height = max(1, (right - left) // 2), bottom + 2
    wrapped = [part for line in lines for part in (textwrap.wrap(line, max(4, (picture.width - 4) // char_width)) or [""])]
    band = min(picture.height, line_height * len(wrapped) + 4)
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle([0, picture.height - band, picture.width, picture.height], fill=(0, 0, 0, 160))
    for k, line in enumerate(wrapped):
        draw.text((2, picture.height - band + 2 + k * line_height), line, fill=(255, 255, 255, 255), font=face)
    return Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB")


def _save(picture, path: str) -> str:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    return str(out)
