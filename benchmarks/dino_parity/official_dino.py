"""facebookresearch/dino's own training code at the recipe of configs/methods_table/dino.yaml (CPU, 32 px).

    python3 benchmarks/dino_parity/official_dino.py --dino /work/dino_official --seed 0 --out RUN_DIR

Imports `main_dino`, `utils` and `vision_transformer` from a checkout of facebookresearch/dino given by
path (never vendored, never needed by the suite) and runs DINO's `train_dino` / `train_one_epoch`
statement by statement, with only these changes (each needed for a CPU, 32 px Fashion-MNIST, or for
the recipe's values, which DINO's argparse cannot express):

1. CPU, one process: no DistributedDataParallel (`student.module` -> `student`), a gloo world of one for
   `DINOLoss.update_center`'s all_reduce, `DistributedSampler(num_replicas=1, rank=0)` (seed 0, as DINO's),
   `torch.autocast("cpu", bfloat16)` instead of `torch.cuda.amp.autocast` + GradScaler (bf16 needs no
   scaler; `--precision fp32` runs without autocast), one torch thread and one loader worker (the same
   2-core budget as densessl's preset: `cpu_threads: 1`, `data.workers: 1`).
2. Data: the same 15,000 evenly spaced images of data/fashion-mnist-train.beton (`training_subset`), PIL
   decode + convert("RGB") as DINO's ImageFolder loader does.
3. Views: DINO's `DataAugmentationDINO`, copied with the recipe's values: crops 32 / 16 px, local scale
   (0.1, 0.4), 4 locals, blur radius U(0.1, 0.5), brightness/contrast 0.4, saturation/hue 0 (grey images),
   Fashion-MNIST mean/std. Everything else (order, probabilities, PIL ops, DINO's GaussianBlur and
   Solarization classes) as released.
4. Backbone: `vision_transformer.VisionTransformer` with `vit_tiny`'s arguments (mlp_ratio 4, qkv_bias,
   LayerNorm eps 1e-6) at width 128, depth 4, 4 heads, patch 8, `img_size=[32]` (the positional
   embedding stored for 4 x 4 patches, as densessl's `model.img_size: 32`), drop_path 0. Head:
   `DINOHead(128, 256, norm_last_layer=False, hidden_dim=256, bottleneck_dim=128)`.
5. Schedules at step granularity (the recipe's warm-up is 0.1 epoch and the last-layer freeze 0.05
   epoch; DINO's are whole epochs): `utils.cosine_scheduler(base, final, epochs=468, niter_per_ep=1,
   warmup_epochs=23)` for lr (peak 0.004 * 64 / 256, min 1e-5), `cosine_scheduler(0.04, 0.1, 468, 1)` for
   weight decay, `cosine_scheduler(0.98, 0.998, 468, 1)` for the teacher momentum (DINO's ends at 1.0);
   `utils.cancel_gradients_last_layer(step, student, 12)` (12 = round(0.05 * 234) steps); teacher
   temperature 0.04 constant (`warmup_teacher_temp_epochs=0`).

Ablation switches (each changes exactly one thing; default = the official code): `--clip global`
(one global-norm clip at 3.0, as DeepSpeed's `gradient_clipping`, instead of `utils.clip_gradients`),
`--backbone timm` (densessl's timm ViT from `model.backbone.build_backbone` instead of DINO's).

Evaluation: densessl's weighted k-NN (`train.knn.knn_accuracy`, k 20, T 0.07, 20,000 memory / 5,000 test
images, 32 px eval transform, recipe mean/std) on the teacher backbone's final-norm cls token, exactly
as `train/main.py` evaluates its teacher. Writes OUT/result.json and OUT/log.jsonl.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

PRESET = ROOT / "configs" / "methods_table" / "dino.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dino", required=True, help="path to a checkout of facebookresearch/dino")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder (result.json, log.jsonl)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--clip", choices=["per_param", "global", "none"], default="per_param",
                   help="per_param: DINO's utils.clip_gradients (default); global: one global-norm clip")
    p.add_argument("--backbone", choices=["dino", "timm"], default="dino")
    p.add_argument("--max-steps", type=int, default=0, help="stop early (smoke test); schedules still span the run")
    p.add_argument("--no-knn", action="store_true")
    return p.parse_args(argv)


class BetonImages(torch.utils.data.Dataset):
    """The recipe's training images (evenly spaced subset), PIL RGB, with a transform (DINO's ImageFolder role)."""

    def __init__(self, path: str, max_samples: int, transform):
        from pipeline.backends.source import open_source
        from pipeline.loader import training_subset

        self.source = open_source(path)
        self.ids = training_subset(len(self.source), max_samples)
        self.transform = transform

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, k):
        index = int(self.ids[k])
        image = Image.open(io.BytesIO(self.source.encoded(index).tobytes())).convert("RGB")
        return self.transform(image), int(self.source.labels[index])


class DataAugmentationDINO:
    """main_dino.DataAugmentationDINO with the recipe's sizes and values (change 3 of the module docstring)."""

    def __init__(self, utils, recipe):
        g, l = recipe.global_views, recipe.local_views
        ga, la = recipe.global_augment, recipe.local_augment
        assert ga.brightness == la.brightness and ga.saturation == la.saturation == 0.0 and ga.hue == la.hue == 0.0
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=ga.brightness, contrast=ga.contrast, saturation=ga.saturation, hue=ga.hue)],
                p=0.8
            ),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize(recipe.mean, recipe.std),
        ])
        rmin, rmax = ga.blur_sigma
        bicubic = transforms.InterpolationMode.BICUBIC  # DINO passes Image.BICUBIC (the same mode)
        # first global crop
        self.global_transfo1 = transforms.Compose([
            transforms.RandomResizedCrop(g.size, scale=tuple(g.scale), interpolation=bicubic),
            flip_and_color_jitter,
            utils.GaussianBlur(1.0, rmin, rmax),
            normalize,
        ])
        # second global crop
        self.global_transfo2 = transforms.Compose([
            transforms.RandomResizedCrop(g.size, scale=tuple(g.scale), interpolation=bicubic),
            flip_and_color_jitter,
            utils.GaussianBlur(0.1, rmin, rmax),
            utils.Solarization(0.2),
            normalize,
        ])
        # transformation for the local small crops
        self.local_crops_number = l.count
        lmin, lmax = la.blur_sigma
        self.local_transfo = transforms.Compose([
            transforms.RandomResizedCrop(l.size, scale=tuple(l.scale), interpolation=bicubic),
            flip_and_color_jitter,
            utils.GaussianBlur(p=0.5, radius_min=lmin, radius_max=lmax),
            normalize,
        ])

    def __call__(self, image):
        crops = []
        crops.append(self.global_transfo1(image))
        crops.append(self.global_transfo2(image))
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops


class TimmBackbone(nn.Module):
    """densessl's timm ViT (model.backbone) returning the final-norm cls token, for --backbone timm."""

    def __init__(self, model_cfg):
        super().__init__()
        from model.backbone import build_backbone

        self.vit = build_backbone(model_cfg)
        self.embed_dim = self.vit.embed_dim

    def forward(self, x):
        from model.backbone import forward_tokens

        return forward_tokens(self.vit, x).cls


def build_backbone(vits, cfg, kind: str, drop_path_rate: float):
    m = cfg.model
    if kind == "timm":
        import dataclasses

        return TimmBackbone(dataclasses.replace(m, drop_path_rate=drop_path_rate))
    return vits.VisionTransformer(
        img_size=[m.img_size], patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=drop_path_rate)


def global_clip(model, clip):
    """One global-norm clip (DeepSpeed's `gradient_clipping`: coef = clip / (norm + 1e-6) if < 1)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    coef = clip / (norm + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return norm


def main(argv=None):
    args = parse_args(argv)
    dino_path = str(Path(args.dino).resolve())
    sys.path.insert(0, dino_path)
    import main_dino  # noqa: E402  (the fetched checkout)
    import utils  # noqa: E402
    import vision_transformer as vits  # noqa: E402
    from train.config import load_config
    from train.knn import knn_accuracy
    from train.schedules import peak_lr

    cfg = load_config([str(PRESET)], [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.cpu_threads or 1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    # ============ DINO's train_dino ============
    utils.fix_random_seeds(args.seed)
    random.seed(args.seed)  # (DINO leaves Python's RNG unseeded; its workers are seeded by the DataLoader)
    transform = DataAugmentationDINO(utils, cfg.recipe)
    dataset = BetonImages(str(ROOT / cfg.data.path), cfg.data.max_samples, transform)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True)
    data_loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=cfg.data.batch_size, num_workers=cfg.data.workers,
        pin_memory=False, drop_last=True, persistent_workers=False)

    head_cfg = cfg.methods.head
    student = build_backbone(vits, cfg, args.backbone, cfg.model.drop_path_rate)
    teacher = build_backbone(vits, cfg, args.backbone, 0.0)
    embed_dim = student.embed_dim
    student = utils.MultiCropWrapper(student, main_dino.DINOHead(
        embed_dim, head_cfg.out_dim, use_bn=False, norm_last_layer=head_cfg.norm_last_layer,
        nlayers=head_cfg.num_layers, hidden_dim=head_cfg.hidden_dim, bottleneck_dim=head_cfg.bottleneck_dim))
    teacher = utils.MultiCropWrapper(teacher, main_dino.DINOHead(
        embed_dim, head_cfg.out_dim, False, nlayers=head_cfg.num_layers, hidden_dim=head_cfg.hidden_dim,
        bottleneck_dim=head_cfg.bottleneck_dim))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False

    dcfg = cfg.methods.dino
    epochs = cfg.schedule.epochs
    dino_loss = main_dino.DINOLoss(
        head_cfg.out_dim, cfg.recipe.local_views.count + 2, dcfg.warmup_teacher_temp, dcfg.teacher_temp,
        0, epochs, student_temp=dcfg.student_temp, center_momentum=dcfg.center_momentum)
    assert dcfg.warmup_teacher_temp == dcfg.teacher_temp  # so W = 0 is the recipe's constant tau_t

    params_groups = utils.get_params_groups(student)
    optimizer = torch.optim.AdamW(params_groups)

    steps_per_epoch = len(data_loader)
    total = epochs * steps_per_epoch
    o = cfg.optim
    warmup_steps = int(round(o.warmup_epochs * steps_per_epoch))
    freeze_steps = int(round(o.freeze_last_layer_epochs * steps_per_epoch))
    lr_schedule = utils.cosine_scheduler(peak_lr(o, cfg.data.batch_size), o.min_lr, total, 1, warmup_epochs=warmup_steps)
    wd_schedule = utils.cosine_scheduler(o.weight_decay, o.weight_decay_end, total, 1)
    momentum_schedule = utils.cosine_scheduler(cfg.schedule.teacher_momentum, cfg.schedule.teacher_momentum_end, total, 1)
    np.savez(out / "schedules.npz", lr=lr_schedule, wd=wd_schedule, momentum=momentum_schedule)
    clip = cfg.deepspeed.gradient_clipping  # 3.0 (DINO's --clip_grad default)

    log = open(out / "log.jsonl", "w")
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
                else torch.autocast("cpu", enabled=False))
    start, clipped_steps, stop = time.time(), 0, False
    norms_seen, clipped_names = [], {}  # clipped_names: parameter -> steps its own norm exceeded the clip
    # ============ DINO's train_one_epoch ============
    for epoch in range(epochs):
        data_loader.sampler.set_epoch(epoch)
        for it, (images, _) in enumerate(data_loader):
            it = steps_per_epoch * epoch + it  # global training iteration
            if args.max_steps and it >= args.max_steps:
                stop = True
                break
            for i, param_group in enumerate(optimizer.param_groups):
                param_group["lr"] = lr_schedule[it]
                if i == 0:  # only the first group is regularized
                    param_group["weight_decay"] = wd_schedule[it]
            with autocast:
                teacher_output = teacher(images[:2])  # only the 2 global views pass through the teacher
                student_output = student(images)
                loss = dino_loss(student_output, teacher_output, epoch)
            if not math.isfinite(loss.item()):
                print("Loss is {}, stopping training".format(loss.item()))
                sys.exit(1)
            optimizer.zero_grad()
            loss.backward()
            total_norm = torch.linalg.vector_norm(torch.stack(
                [p.grad.detach().float().norm() for p in student.parameters() if p.grad is not None])).item()
            if args.clip == "per_param":
                param_norms = utils.clip_gradients(student, clip)
                clipped_steps += max(param_norms) > clip
                names = [n for n, q in student.named_parameters() if q.grad is not None]
                for name, norm in zip(names, param_norms):
                    if norm > clip:
                        clipped_names[name] = clipped_names.get(name, 0) + 1
            elif args.clip == "global":
                global_clip(student, clip)
                clipped_steps += total_norm > clip
            utils.cancel_gradients_last_layer(it, student, freeze_steps)  # (step, not epoch: change 5)
            optimizer.step()
            # EMA update for the teacher
            with torch.no_grad():
                m = momentum_schedule[it]  # momentum parameter
                for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                    param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
            norms_seen.append(total_norm)
            if (it + 1) % cfg.log.every_steps == 0 or it + 1 == total:
                with torch.no_grad():
                    t = torch.softmax((teacher_output.float() - dino_loss.center) / dcfg.teacher_temp, dim=-1)
                    ent = torch.special.entr(t).sum(-1).mean().item()
                    protos = torch.special.entr(t.mean(0)).sum().exp().item()
                record = {"step": it + 1, "loss": loss.item(), "lr": lr_schedule[it], "wd": wd_schedule[it],
                          "momentum": m, "grad_norm": total_norm, "target_entropy": ent, "prototypes_in_use": protos,
                          "elapsed_s": time.time() - start}
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(json.dumps(record), flush=True)
        if stop:
            break
    train_s = time.time() - start
    result = {"arm_args": vars(args), "seed": args.seed, "train_seconds": train_s, "steps": len(norms_seen),
              "clipped_steps": int(clipped_steps), "grad_norm_mean": float(np.mean(norms_seen)),
              "grad_norm_max": float(np.max(norms_seen)), "clipped_parameters": clipped_names}
    if not args.no_knn:
        backbone = teacher.backbone.eval()
        result.update(knn_accuracy(lambda x: backbone(x), cfg.eval, torch.device("cpu"), workers=cfg.data.workers,
                                   mean=cfg.recipe.mean, std=cfg.recipe.std))
    torch.save(teacher.state_dict(), out / "teacher.pth")
    group_names = [[n for n, q in student.named_parameters() if any(q is x for x in g["params"])] for g in params_groups]
    torch.save({"optimizer": optimizer.state_dict(), "group_names": group_names}, out / "optimizer.pth")  # adam_state.py
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
