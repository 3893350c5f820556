"""Diagnostics: can a pre-trained model's frozen features ground expressions and match texts, and can
its own fusion layers learn to? (The question behind the demo's NLVR2 / grounding / ITM rows.)

Caches, once, the vision tokens and the text-layer states of a model (``--init``, an ``init`` spec as
in the configs, e.g. ``ours:runs/demo/pretrain/stage2``) for the world's RefCOCO+-style training and
validation expressions, then trains small things on the cached features and prints validation
figures:

- ``attention-boxes``: one attention read-out (query from the text CLS state, keys from the patch
  tokens) whose softmax weights average either the patch centres (``--positions grid``: is the
  object found?) or a learned linear read-out of the tokens (``--positions tokens``: can the tokens
  say where they are?), plus a width/height from the text; box accuracy at IoU >= 0.5;
- ``attention-itm``: the same read-out pooling token values, an MLP on [pooled, query] -> match,
  trained on pairs whose image is swapped for a random other one half of the time; accuracy;
- ``fusion-boxes`` / ``fusion-itm``: the model's fusion layers and its box / ITM head, trained on the
  same cached inputs and the same targets (``--reinit-fusion``: from BERT's random initialisation).

If an attention read-out learns a task that the fusion layers do not, the fusion's optimisation is
what fails, not the features. Measured on the small world (seed 0), the std-0.02 position table, a
stage-1 checkpoint: attention-boxes (grid) 24 %, (tokens) 2 %; with the sincos table (tokens) 16 %;
attention-itm 70 %, fusion-itm 50 % (chance) after 600 steps. On the demo's stage-2 model (sincos
table): fusion-itm 48.4 % after 600 steps with all three fusion layers, 64.2 % with
``--keep-fusion-layers 1``. With a linear warm-up (``--warmup 60 --clip 1``) and 3e-4 for all three
layers: 57.7 / 63.5 / 57.2 % at 200/400/600 steps; but chance again with the cross-attention alone at
1e-3 and the rest at 2e-5 (``--cross-lr 1e-3 --lr 2e-5``), with 1e-3 / 3e-4, and with re-initialised
fusion layers at 3e-4 (stopped at 400 steps); one layer with ``--cross-lr 1e-3 --lr 2e-5``: 56-58 %.
Session 7, on the stage-2 model of a demo run at commit 3fe3b95 (patch-aligned world, three fusion
layers; 3,000 training / 600 validation expressions, 300 steps): attention-itm 76.0 %; fusion-itm
with all three layers 60.5 / 51.8 % at 200 / 300 steps, and the same with the cross-attention's
query/key weights re-drawn at std 0.05 or 0.1 (``--cross-qk-std``; 51-54 %), or 0.05 with
``--cross-lr 1e-3 --warmup 30`` (50 %); the first two layers alone (``--keep-fusion-layers 2``) 67.5 /
62.3 %, and 63.7 / 63.2 % with ``--lr 2e-5 --cross-lr 3e-4``; the first layer alone with ``--lr 2e-5
--cross-lr 3e-4`` 67.2 / 64.5 %. On the two-layer preset's own stage-2 model (demo_s7c; its fusion
layers from MiniLM's layers 4-5 by the official upper-layer rule) with ``--lr 2e-5 --cross-lr 3e-4``:
60.3 / 66.8 %. Two fusion layers learn here, three do not; the small preset now has two. Minutes per
probe on one core (about a minute at these sizes).
Session 8, on the stage-2 model of a demo run with objects two and three patches wide (runs/exp48,
commit e26d2a2; 3,000 / 600 expressions): attention-boxes 46 %; fusion-boxes at 3e-4 for every fusion
weight 9.5 / 19.0 / 30.3 / 37.5 % at 200 / 400 / 600 / 800 steps; with the cross-attention and the
box head at 3e-4 and the rest of the fusion at 2e-5 (``--lr 2e-5 --cross-lr 3e-4``, the pre-training
configs' rule) 10.3 / 31.0 % at 200 / 400; everything at 1e-4: 8.5 / 10.5 %; at 1e-3: 5.0 / 5.0 %
(the mean box's level); 3e-4 with the cross-attention's query/key re-drawn at std 0.1 and 1e-3 for
them: 4.5 / 6.5 %. Batches made of whole images (all expressions of 4-5 images, a one-off variant)
instead of random expressions: 9.0 / 9.3 %. The fusion learns grounding, but only after ~10,000 box
examples; the demo's stage 2 and grounding fine-tuning show it about 1,400 each. Matching on the same
model with ``--lr 2e-5 --cross-lr 3e-4``: fusion-itm 67.2 / 71.8 / 74.0 % at 200 / 400 / 600 steps,
attention-itm 76.5 / 74.7 / 75.0 % at 500 / 1,000 / 1,500: against random negatives the fusion now
matches about as well as the read-out (stage 2's ITM, against hard negatives, stays at chance).
Session 11, on demo_s9c's stage-1 model (no ITM trained yet; 3,000 / 600 expressions, ``--lr 2e-5
--cross-lr 3e-4``, 300 steps): with the cross-attention re-drawn as BERT initialises it
(``--cross-init random``) fusion-itm reaches 68.0 / 68.7 % at 200 / 300 steps; copied from each
layer's own self-attention (``--cross-init self``) 51.3 / 51.7 %. Against random negatives the
fusion learns to match within 200 steps of 32 on fixed features; in pre-training (stage 1 with ITM
switched on, towers training, ITC-sampled negatives) the ITM loss stayed at 0.62-0.64 for 240 steps.

    python bench/probe_fusion.py --init ours:runs/demo/pretrain/stage2 --world runs/demo/world \\
        --probe attention-boxes attention-itm fusion-itm
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from x2vlm.config import preset
from x2vlm.data.transforms import EvalTransform
from x2vlm.data.video import load_image
from x2vlm.models.x2vlm import X2VLM
from x2vlm.objectives import box_losses
from x2vlm.tasks.grounding import inclusive_iou, load_grounding_file
from x2vlm.tokenizer import load_tokenizer
from x2vlm.train.pretrain import initialise

log = logging.getLogger("probe_fusion")
PROBES = ("attention-boxes", "attention-itm", "fusion-boxes", "fusion-itm")


class Cached:
    """Frozen inputs of one split: vision tokens per image, text states per expression, targets."""

    def __init__(self, model: X2VLM, items, image_root: Path, tokenizer, max_tokens: int = 24):
        transform = EvalTransform(model.cfg.image_res)
        images = sorted({item.image for item in items})
        index = {name: k for k, name in enumerate(images)}
        with torch.no_grad():
            vision = []
            for start in range(0, len(images), 64):
                pixels = torch.stack([transform(load_image(str(image_root / name), is_path=True, source=name, field="image"))
                                      for name in images[start : start + 64]])
                vision.append(model.encode_images(pixels)[0])
            self.vision = torch.cat(vision)
            ids, self.text_mask = tokenizer([item.text for item in items], max_length=max_tokens)
            self.text = torch.cat([model.encode_text(ids[s : s + 256], self.text_mask[s : s + 256]) for s in range(0, len(items), 256)])
        self.image_of = torch.tensor([index[item.image] for item in items])
        self.boxes = torch.tensor([item.box for item in items], dtype=torch.float32)  # [x, y, w, h] pixels
        res = model.cfg.image_res
        x, y, w, h = self.boxes.unbind(-1)
        self.targets = torch.stack([(x + w / 2) / res, (y + h / 2) / res, w / res, h / res], dim=-1)
        self.res = res

    def __len__(self) -> int:
        return len(self.image_of)

    def pairs(self, rows: torch.Tensor, generator: torch.Generator | None = None):
        """Vision tokens of each row's own image, or half of the time a random image; label 1 = match."""
        images = self.image_of[rows].clone()
        swap = torch.rand(len(rows), generator=generator) < 0.5
        images[swap] = self.image_of[torch.randint(0, len(self), (len(rows),), generator=generator)][swap]
        return self.vision[images], (images == self.image_of[rows]).long()


def box_accuracy(pred_cxcywh: torch.Tensor, data: Cached) -> float:
    cx, cy, w, h = (pred_cxcywh.float() * data.res).unbind(-1)
    boxes = torch.stack([cx - w / 2, cy - h / 2, w, h], dim=-1).numpy()
    return 100.0 * float((inclusive_iou(boxes, data.boxes.numpy()) >= 0.5).mean())


class AttentionReadout(nn.Module):
    def __init__(self, width: int, grid: int, positions: str, dim: int = 128):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(width, dim), nn.Linear(width, dim), nn.Linear(width, dim)
        self.where = nn.Linear(width, 2)  # positions 'tokens': the tokens' own coordinates
        self.size = nn.Linear(width, 2)
        self.match = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 2))
        centres = (torch.arange(grid) + 0.5) / grid
        rows, cols = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("centres", torch.stack([cols.flatten(), rows.flatten()], dim=-1))
        self.positions = positions

    def weights(self, vision: torch.Tensor, text_cls: torch.Tensor) -> torch.Tensor:
        q, k = self.query(text_cls), self.key(vision[:, 1:])
        return (torch.einsum("bd,bnd->bn", q, k) / q.shape[-1] ** 0.5).softmax(dim=-1)

    def boxes(self, vision: torch.Tensor, text_cls: torch.Tensor) -> torch.Tensor:
        weights = self.weights(vision, text_cls)
        if self.positions == "grid":
            centre = weights @ self.centres
        else:
            centre = (weights.unsqueeze(-1) * self.where(vision[:, 1:])).sum(1).sigmoid()
        return torch.cat([centre, self.size(text_cls).sigmoid()], dim=-1)

    def itm(self, vision: torch.Tensor, text_cls: torch.Tensor) -> torch.Tensor:
        pooled = (self.weights(vision, text_cls).unsqueeze(-1) * self.value(vision[:, 1:])).sum(1)
        return self.match(torch.cat([pooled, self.query(text_cls)], dim=-1))


def train_loop(name: str, params, loss_fn, evaluate, steps: int, lr: float, batch: int, n: int, every: int = 200,
               warmup: int = 0, clip: float | None = None) -> None:
    """``params``: parameters, or AdamW parameter groups each with its own ``lr``."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    for step in range(1, steps + 1):
        loss = loss_fn(torch.randint(0, n, (batch,)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
        optimizer.step()
        scheduler.step()
        if step % every == 0 or step == steps:
            log.info("%s step %d: loss %.3f, validation %s", name, step, loss.item(), evaluate())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="init spec of the model, e.g. ours:runs/demo/pretrain/stage2")
    parser.add_argument("--world", default="runs/demo/world")
    parser.add_argument("--preset", default="x2vlm-small")
    parser.add_argument("--probe", nargs="+", default=["attention-boxes", "attention-itm", "fusion-itm"], choices=PROBES)
    parser.add_argument("--positions", default="grid", choices=("grid", "tokens"))
    parser.add_argument("--steps", type=int, default=600, help="fusion probes")
    parser.add_argument("--attention-steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-4, help="fusion probes (the attention read-outs take 1e-3)")
    parser.add_argument("--cross-lr", type=float, default=None,
                        help="fusion probes: rate of the cross-attention and the head (the rest of the fusion layers: --lr)")
    parser.add_argument("--warmup", type=int, default=0, help="fusion probes: linear warm-up steps")
    parser.add_argument("--clip", type=float, default=None, help="fusion probes: gradient-norm clipping")
    parser.add_argument("--train-expressions", type=int, default=6000)
    parser.add_argument("--val-expressions", type=int, default=1200)
    parser.add_argument("--reinit-fusion", action="store_true")
    parser.add_argument("--cross-qk-std", type=float, default=None,
                        help="fusion probes: re-draw the cross-attention query and key weights with this std "
                             "(BERT's 0.02 gives attention logits of std ~0.15 at width 384: uniform attention)")
    parser.add_argument("--cross-init", choices=("keep", "random", "self"), default="keep",
                        help="fusion probes: the cross-attention as loaded, re-drawn as BERT initialises it, or "
                             "copied from the same layer's self-attention (vision and text widths equal)")
    parser.add_argument("--keep-fusion-layers", type=int, default=None,
                        help="fusion probes: run only the first N fusion layers (depth bisection)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)

    cfg = preset(args.preset).replace(task="pretrain")
    model = X2VLM(cfg)
    initialise(model, args.init)
    model.eval()
    tokenizer = load_tokenizer(cfg.tokenizer)
    world = Path(args.world)
    refer = dict(refs_file=world / "refcoco+/refs(unc).p", instances_file=world / "refcoco+/instances.json")
    start = time.perf_counter()
    train = Cached(model, load_grounding_file(world / "refcoco+/refcoco+_train.json", **refer)[: args.train_expressions],
                   world / "images", tokenizer)
    val = Cached(model, load_grounding_file(world / "refcoco+/refcoco+_val.json", **refer)[: args.val_expressions],
                 world / "images", tokenizer)
    log.info("cached %d training / %d validation expressions (%d / %d images) in %.0f s", len(train), len(val),
             len(train.vision), len(val.vision), time.perf_counter() - start)
    grid = int(round((train.vision.shape[1] - 1) ** 0.5))
    val_generator = lambda: torch.Generator().manual_seed(1)  # noqa: E731 - the same validation pairs each time

    for probe in args.probe:
        if probe.startswith("attention"):
            readout = AttentionReadout(train.vision.shape[-1], grid, args.positions)
            if probe == "attention-boxes":
                loss_fn = lambda rows: (readout.boxes(train.vision[train.image_of[rows]], train.text[rows, 0]) - train.targets[rows]).abs().sum(-1).mean()  # noqa: E731
                evaluate = lambda: f"box accuracy {box_accuracy(readout.boxes(val.vision[val.image_of], val.text[:, 0]).detach(), val):.1f} %"  # noqa: E731
            else:
                def loss_fn(rows):
                    vision, labels = train.pairs(rows)
                    return F.cross_entropy(readout.itm(vision, train.text[rows, 0]), labels)

                def evaluate():
                    with torch.no_grad():
                        vision, labels = val.pairs(torch.arange(len(val)), val_generator())
                        return f"ITM accuracy {100.0 * float((readout.itm(vision, val.text[:, 0]).argmax(-1) == labels).float().mean()):.1f} %"
            train_loop(probe, readout.parameters(), loss_fn, evaluate, args.attention_steps, 1e-3, 64, len(train), every=500)
            continue

        fusion_model = X2VLM(cfg)
        fusion_model.load_state_dict(model.state_dict())
        if args.keep_fusion_layers is not None:
            kept = fusion_model.text_encoder.encoder.layer[: cfg.text.fusion_start + args.keep_fusion_layers]
            fusion_model.text_encoder.encoder.layer = kept
        layers = fusion_model.text_encoder.encoder.layer[cfg.text.fusion_start :]
        if args.reinit_fusion:
            for module in layers.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        if args.cross_qk_std is not None:
            for layer in layers:
                for linear in (layer.crossattention.self.query, layer.crossattention.self.key):
                    nn.init.normal_(linear.weight, std=args.cross_qk_std)
                    nn.init.zeros_(linear.bias)
        if args.cross_init != "keep":
            for layer in layers:
                cross, own = layer.crossattention, layer.attention
                for name in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                    target, source = cross.get_submodule(name), own.get_submodule(name)
                    if args.cross_init == "self":
                        target.load_state_dict(source.state_dict())
                    elif isinstance(target, nn.Linear):
                        nn.init.normal_(target.weight, std=0.02)
                        nn.init.zeros_(target.bias)
                    else:
                        nn.init.ones_(target.weight)
                        nn.init.zeros_(target.bias)
        head = fusion_model.bbox_head if probe == "fusion-boxes" else fusion_model.itm_head
        for param in fusion_model.parameters():
            param.requires_grad_(False)
        trained = list(layers.parameters()) + list(head.parameters())
        for param in trained:
            param.requires_grad_(True)
        if args.cross_lr is not None:
            cross = [p for n, p in layers.named_parameters() if ".crossattention." in f".{n}"] + list(head.parameters())
            chosen = {id(p) for p in cross}
            trained = [{"params": cross, "lr": args.cross_lr}, {"params": [p for p in trained if id(p) not in chosen], "lr": args.lr}]
        fusion_model.train()

        def fused_cls(data: Cached, rows: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
            return fusion_model.fuse(data.text[rows], data.text_mask[rows], vision, torch.ones(vision.shape[:2], dtype=torch.long))

        if probe == "fusion-boxes":
            def loss_fn(rows):
                pred = fusion_model.bbox_head(fused_cls(train, rows, train.vision[train.image_of[rows]])[:, 0]).sigmoid()
                l1, giou = box_losses(pred, train.targets[rows])
                return l1 + giou

            def evaluate():
                fusion_model.eval()
                with torch.no_grad():
                    preds = [fusion_model.bbox_head(fused_cls(val, rows, val.vision[val.image_of[rows]])[:, 0]).sigmoid()
                             for rows in torch.arange(len(val)).split(128)]
                fusion_model.train()
                return f"box accuracy {box_accuracy(torch.cat(preds), val):.1f} %"
        else:
            def loss_fn(rows):
                vision, labels = train.pairs(rows)
                return F.cross_entropy(fusion_model.itm_logits(fused_cls(train, rows, vision)), labels)

            def evaluate():
                fusion_model.eval()
                generator, correct = val_generator(), 0
                with torch.no_grad():
                    for rows in torch.arange(len(val)).split(128):
                        vision, labels = val.pairs(rows, generator)
                        correct += int((fusion_model.itm_logits(fused_cls(val, rows, vision)).argmax(-1) == labels).sum())
                fusion_model.train()
                return f"ITM accuracy {100.0 * correct / len(val):.1f} %"
        train_loop(probe, trained, loss_fn, evaluate, args.steps, args.lr, 32, len(train), warmup=args.warmup, clip=args.clip)


if __name__ == "__main__":
    main()
