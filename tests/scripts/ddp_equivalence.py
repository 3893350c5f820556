"""Run under torchrun with 2 processes: pre-training losses and gradients over two ranks equal one
process over the concatenated batch. Writes a JSON verdict to argv[1] (rank 0)."""

import json
import sys
from types import SimpleNamespace

import torch

from x2vlm import objectives as O
from x2vlm.config import preset
from x2vlm.models.x2vlm import X2VLM
from x2vlm.train.distributed import init_distributed
from x2vlm.data.pretrain import SourceConfig
from x2vlm.train.pretrain import PretrainObjective


def make_model() -> X2VLM:
    torch.manual_seed(0)
    cfg = preset("x2vlm-tiny", text={"hidden_dropout": 0.0, "attention_dropout": 0.0}, vision={"drop_path_rate": 0.0})
    return X2VLM(cfg).train()


def make_batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(104, 512, (n, 10), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    masked = ids.clone()
    pos = torch.tensor([[1, 3, 5]] * n)
    targets = ids.gather(1, pos)
    targets[0, 2] = -100
    masked.scatter_(1, pos, 103)
    return SimpleNamespace(images=torch.randn(n, 3, 64, 64, generator=g), text_ids=ids, text_mask=mask,
                           masked_ids=masked, masked_pos=pos, masked_targets=targets)


def half(batch, rank: int, world: int):
    n = batch.images.shape[0] // world
    return SimpleNamespace(**{k: v[rank * n:(rank + 1) * n] for k, v in vars(batch).items()})


def main() -> None:
    info = init_distributed()
    batch = make_batch()
    # distributed: each rank its half, DDP-wrapped objective
    model = make_model()
    sources = {"images": SourceConfig(kind="image_text", paths=["(in memory)"], batch_size=3)}
    objective = torch.nn.parallel.DistributedDataParallel(PretrainObjective(model, sources), find_unused_parameters=True)
    generator = torch.Generator().manual_seed(100 + info.rank)
    total, losses = objective({"images": half(batch, info.rank, info.world_size)}, generator, True)
    total.backward()
    dist_losses = {k[len("image_"):]: torch.tensor(float(v.detach())) for k, v in losses.items()}
    for v in dist_losses.values():
        torch.distributed.all_reduce(v)
    dist_losses = {k: float(v) / info.world_size for k, v in dist_losses.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # every rank done with collectives before any tears its group down (a rank leaving early while
    # the other's gloo threads still talk to it aborted once under load: "terminate called ...")
    # Both ranks tear the group down together, right after it; rank 0 building its reference model
    # first left rank 1 closing alone, and it aborted again once (session 12, CI under load).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if info.rank == 0:
        # reference: one process, the whole batch; ITM per half with the same draws (ITM is local)
        ref = make_model()
        vision, vmask = ref.encode_images(batch.images)
        text = ref.encode_text(batch.text_ids, batch.text_mask)
        vfeat, tfeat = ref.vision_features(vision), ref.text_features(text)
        itc = O.contrastive_loss(vfeat, tfeat, ref.temp)
        n = batch.images.shape[0] // info.world_size
        itm = 0.0
        for r in range(info.world_size):
            rows = slice(r * n, (r + 1) * n)
            neg_img, neg_txt = O.sample_negatives(vfeat[rows], tfeat[rows], ref.temp, generator=torch.Generator().manual_seed(100 + r))
            logits = O.matching_logits(ref, vision[rows], vmask[rows], text[rows], batch.text_mask[rows], neg_img, neg_txt)
            itm = itm + O.matching_loss(logits) / info.world_size
        mlm = O.mlm_loss(ref.mlm_logits(batch.masked_ids, batch.text_mask, vision, vmask, batch.masked_pos), batch.masked_targets)
        (itc + itm + mlm).backward()
        ref_losses = {"itc": float(itc), "itm": float(itm), "mlm": float(mlm)}
        worst = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters() if p.grad is not None)
        missing = [n for n, p in ref.named_parameters() if (p.grad is None) != (n not in grads)]
        with open(sys.argv[1], "w") as fh:
            json.dump({"dist_losses": dist_losses, "ref_losses": ref_losses, "max_grad_diff": worst, "grad_presence_mismatch": missing}, fh)


if __name__ == "__main__":
    main()
