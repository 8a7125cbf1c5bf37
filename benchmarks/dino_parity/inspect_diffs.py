"""Diff densessl and DINO's code on each point of issue 26 by printing, before any training run.

    python3 benchmarks/dino_parity/inspect_diffs.py --dino /work/dino_official [--json OUT.json]

Points (each printed with the figures that decide whether a difference exists):
1. schedules: densessl's per-step lr / weight decay / teacher momentum (`train.schedules.build_schedules`)
   against DINO's `utils.cosine_scheduler` as the harness calls it; last-layer freeze steps.
2. parameter groups: decay / no-decay / last-layer membership by name (DINO `utils.get_params_groups`).
3. initialization: per-parameter statistics of DINO's `VisionTransformer` + `DINOHead` against densessl's
   `SSLModel` (timm ViT + `DinoHead`), over several seeds.
4. the positional embedding of a 16 px local view (2 x 2 patches): timm's resampling against DINO's
   `interpolate_pos_encoding`, on the same 4 x 4 embedding.
5. EMA parameter set and the centre/loss: DINO's `DINOLoss` and densessl's `DinoLoss` on the same logits.
6. augmentation statistics: pixel statistics of the views of densessl's reference backend and of the
   harness's `DataAugmentationDINO` on the same images.
7. k-NN: DINO's `eval_knn.knn_classifier` and densessl's `knn_classify` on the same features.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dino", required=True)
    p.add_argument("--json")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--images", type=int, default=512, help="images for the augmentation statistics")
    args = p.parse_args()
    sys.path.insert(0, str(Path(args.dino).resolve()))
    import main_dino
    import utils
    import vision_transformer as vits

    import official_dino as harness
    from model import SSLModel
    from model.methods.dino import DinoLoss
    from model.methods.common import DistillationConfig  # noqa: F401
    from train.config import load_config
    from train.engine import parameter_groups
    from train.schedules import build_schedules, peak_lr

    torch.set_num_threads(1)
    cfg = load_config([str(harness.PRESET)], [])
    report = {}

    # 1. schedules
    steps_per_epoch = 15000 // 64
    total = cfg.schedule.epochs * steps_per_epoch
    ours = build_schedules(cfg.optim, cfg.schedule, steps_per_epoch, 64)
    o = cfg.optim
    warm = int(round(o.warmup_epochs * steps_per_epoch))
    theirs = {
        "lr": utils.cosine_scheduler(peak_lr(o, 64), o.min_lr, total, 1, warmup_epochs=warm),
        "weight_decay": utils.cosine_scheduler(o.weight_decay, o.weight_decay_end, total, 1),
        "teacher_momentum": utils.cosine_scheduler(cfg.schedule.teacher_momentum, cfg.schedule.teacher_momentum_end, total, 1),
    }
    sched = {}
    for name, arr in theirs.items():
        mine = getattr(ours, name)
        diff = np.abs(mine - arr)
        sched[name] = {"max_abs_diff": float(diff.max()), "argmax_step": int(diff.argmax()),
                       "max_rel_diff": float((diff / np.maximum(np.abs(arr), 1e-12)).max()),
                       "densessl_first5": mine[:5].tolist(), "dino_first5": arr[:5].tolist(),
                       "densessl_last": float(mine[-1]), "dino_last": float(arr[-1]),
                       "densessl_sum": float(mine.sum()), "dino_sum": float(arr.sum())}
    sched["freeze_last_layer_steps"] = {"densessl": ours.freeze_last_layer_steps,
                                        "dino_harness": int(round(o.freeze_last_layer_epochs * steps_per_epoch))}
    report["schedules"] = sched
    print("== 1. schedules (per step, 468 steps)")
    for k, v in sched.items():
        print(f"  {k}: {v}")

    # model pairs
    def dino_model(seed):
        torch.manual_seed(seed)
        backbone = harness.build_backbone(vits, cfg, "dino", 0.0)
        h = cfg.methods.head
        return utils.MultiCropWrapper(backbone, main_dino.DINOHead(
            backbone.embed_dim, h.out_dim, use_bn=False, norm_last_layer=h.norm_last_layer, nlayers=h.num_layers,
            hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim))

    def dense_model(seed):
        torch.manual_seed(seed)
        return SSLModel(cfg.model, cfg.methods)

    # name map densessl -> DINO
    def to_dino_name(n):
        n = n.replace("head.last_layer.weight", "head.last_layer.weight_v").replace("head.last_layer.scale", "head.last_layer.weight_g")
        return n

    d0, s0 = dino_model(0), dense_model(0)
    dino_names = dict(d0.named_parameters())
    dense_names = dict(s0.named_parameters())
    mapped = {to_dino_name(n): n for n in dense_names}
    only_dense = sorted(n for n in mapped if n not in dino_names)
    only_dino = sorted(n for n in dino_names if n not in mapped)
    shape_diff = [(n, tuple(dense_names[mapped[n]].shape), tuple(dino_names[n].shape)) for n in mapped
                  if n in dino_names and dense_names[mapped[n]].numel() != dino_names[n].numel()]
    report["parameters"] = {"densessl_count": sum(p.numel() for p in s0.parameters()),
                            "dino_count": sum(p.numel() for p in d0.parameters()),
                            "only_densessl": only_dense, "only_dino": only_dino, "shape_diff": shape_diff}
    print("== parameters: densessl %d, DINO %d; only densessl %s; only DINO %s; shape differences %s" % (
        report["parameters"]["densessl_count"], report["parameters"]["dino_count"], only_dense, only_dino, shape_diff))

    # 2. parameter groups
    groups, kinds = parameter_groups(s0)
    dense_decay = {mapped_name for g, k in zip(groups, kinds) if k["decay"] for p in g["params"]
                   for mapped_name in [to_dino_name(next(n for n, q in s0.named_parameters() if q is p))]}
    dg = utils.get_params_groups(d0)
    dino_decay = {n for n, q in d0.named_parameters() if any(q is x for x in dg[0]["params"])}
    report["param_groups"] = {"decay_only_densessl": sorted(dense_decay - dino_decay),
                              "decay_only_dino": sorted(dino_decay - dense_decay),
                              "last_layer_group_densessl": sorted(to_dino_name(next(n for n, q in s0.named_parameters() if q is p))
                                                                  for g, k in zip(groups, kinds) if k["last_layer"] for p in g["params"]),
                              "dino_cancel_last_layer": sorted(n for n in dino_names if "last_layer" in n)}
    print("== 2. parameter groups:", report["param_groups"])

    # 3. init statistics (std and mean over seeds)
    stats = {}
    for seed in range(args.seeds):
        d, s = dino_model(seed), dense_model(seed)
        dp = dict(d.named_parameters())
        for n, q in s.named_parameters():
            dn = to_dino_name(n)
            if dn not in dp:
                continue
            a, b = q.detach().double().flatten(), dp[dn].detach().double().flatten()
            if "last_layer.weight" in n:  # weight norm: direction matters; compare row norms
                a, b = q.detach().double().norm(dim=1), dp[dn].detach().double().norm(dim=1)
            e = stats.setdefault(dn, {"densessl_std": [], "dino_std": [], "densessl_mean": [], "dino_mean": [],
                                      "densessl_absmax": [], "dino_absmax": []})
            e["densessl_std"].append(a.std().item() if a.numel() > 1 else a.abs().item())
            e["dino_std"].append(b.std().item() if b.numel() > 1 else b.abs().item())
            e["densessl_mean"].append(a.mean().item())
            e["dino_mean"].append(b.mean().item())
            e["densessl_absmax"].append(a.abs().max().item())
            e["dino_absmax"].append(b.abs().max().item())
    init = {}
    print("== 3. init statistics over %d seeds (std / mean / |max|; last_layer.weight_v: row norms)" % args.seeds)
    for n, e in stats.items():
        row = {k: float(np.mean(v)) for k, v in e.items()}
        differs = (abs(row["densessl_std"] - row["dino_std"]) > 0.1 * max(row["dino_std"], 1e-8) or
                   abs(row["densessl_mean"] - row["dino_mean"]) > 0.1 * max(row["dino_std"], 1e-3))
        row["differs"] = bool(differs)
        init[n] = row
        if differs or "blocks.1" not in n and "blocks.2" not in n and "blocks.3" not in n:
            print(f"  {'DIFFERS ' if differs else ''}{n}: densessl std {row['densessl_std']:.3g} mean {row['densessl_mean']:.3g} "
                  f"|max| {row['densessl_absmax']:.3g}; DINO std {row['dino_std']:.3g} mean {row['dino_mean']:.3g} "
                  f"|max| {row['dino_absmax']:.3g}")
    report["init"] = init
    eps = {"densessl": sorted({m.eps for m in s0.modules() if isinstance(m, nn.LayerNorm)}),
           "dino": sorted({m.eps for m in d0.modules() if isinstance(m, nn.LayerNorm)})}
    qkv_bias = {"densessl": s0.backbone.blocks[0].attn.qkv.bias is not None, "dino": d0.backbone.blocks[0].attn.qkv.bias is not None}
    report["layer_norm_eps"], report["qkv_bias"] = eps, qkv_bias
    print("== layer-norm eps", eps, "qkv bias", qkv_bias)

    # 4. positional embedding of a local view
    from densessl_arm import dino_resample_abs_pos_embed as dino_resample
    pe = d0.backbone.pos_embed.detach().clone()
    from timm.layers import resample_abs_pos_embed
    timm_local = resample_abs_pos_embed(pe, new_size=(2, 2), old_size=(4, 4), num_prefix_tokens=1)
    d0.backbone.patch_embed.patch_size = 8
    dino_local = d0.backbone.interpolate_pos_encoding(torch.zeros(1, 5, 128), 16, 16).detach()
    ours_dino = dino_resample(pe, (2, 2), (4, 4), 1)
    a, b = timm_local[0, 1:], dino_local[0, 1:]
    pos = {"max_abs_diff": (a - b).abs().max().item(), "rel_diff_norm": ((a - b).norm() / b.norm()).item(),
           "cosine_per_position": torch.nn.functional.cosine_similarity(a, b, dim=1).tolist(),
           "timm_rms": a.pow(2).mean().sqrt().item(), "dino_rms": b.pow(2).mean().sqrt().item(),
           "source_rms": pe[0, 1:].pow(2).mean().sqrt().item(),
           "harness_dino_resample_equals_dino": bool(torch.allclose(ours_dino, dino_local, atol=1e-6))}
    report["local_pos_embed"] = pos
    print("== 4. 2x2 positional embedding of a 16 px view:", pos)

    # 5. EMA set, centre and loss
    ema = {"densessl": [to_dino_name(n) for n, _ in s0.named_parameters()], "dino": [n for n, _ in d0.named_parameters()]}
    report["ema_same_set"] = sorted(ema["densessl"]) == sorted(ema["dino"])
    torch.manual_seed(0)
    K, B, V = cfg.methods.head.out_dim, 64, 6
    dl = main_dino.DINOLoss(K, V, 0.04, 0.04, 0, 2)
    ol = DinoLoss(cfg.methods.dino, K)
    import torch.distributed as dist
    if not dist.is_initialized():
        import socket
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    class State:
        epoch, step, collect_stats = 0.0, 0, False
    diffs = []
    for _ in range(5):
        t, s = torch.randn(2 * B, K) * 3, torch.randn(V * B, K) * 3
        l1 = dl(s, t, 0)
        l2 = ol({"cls_logits": s.view(V, B, K)}, {"cls_logits": t.view(2, B, K)}, None, State())["dino"]
        diffs.append((abs(l1.item() - l2.item()), (dl.center.flatten() - ol.center).abs().max().item()))
    report["loss_center"] = {"max_loss_diff": max(d[0] for d in diffs), "max_center_diff": max(d[1] for d in diffs)}
    print("== 5. EMA over the same parameters (all of them, both codes):", report["ema_same_set"], "| loss/centre:", report["loss_center"])

    # 6. augmentation statistics
    from pipeline.backends.reference import ReferenceBatchMaker
    from pipeline.backends.source import open_source
    from pipeline.loader import training_subset
    source = open_source(str(ROOT / cfg.data.path))
    ids = training_subset(len(source), cfg.data.max_samples)[: args.images]
    maker = ReferenceBatchMaker(source, cfg.recipe)
    views, _ = maker.make(ids, seed=1234)
    dataset = harness.BetonImages(str(ROOT / cfg.data.path), cfg.data.max_samples, harness.DataAugmentationDINO(utils, cfg.recipe))
    import random
    random.seed(0)
    torch.manual_seed(0)
    crops = [dataset[k][0] for k in range(args.images)]
    g_dino = torch.stack([torch.stack(c[:2]) for c in crops]).transpose(0, 1)  # [2, N, 3, 32, 32]
    l_dino = torch.stack([torch.stack(c[2:]) for c in crops]).transpose(0, 1)
    aug = {}
    for kind, ours_v, theirs_v in (("global0", views.global_crops[0], g_dino[0]), ("global1", views.global_crops[1], g_dino[1]),
                                   ("locals", views.local_crops.flatten(0, 1), l_dino.flatten(0, 1))):
        def st(x):
            x = x.float()
            return {"mean": x.mean().item(), "std": x.std().item(), "per_image_std_mean": x.flatten(1).std(1).mean().item(),
                    "frac_background": (x < (0.02 - cfg.recipe.mean[0]) / cfg.recipe.std[0]).float().mean().item()}
        aug[kind] = {"densessl_reference": st(ours_v), "dino": st(theirs_v)}
    report["augmentation"] = aug
    print("== 6. view statistics (normalized pixels,", args.images, "images):")
    for k, v in aug.items():
        print(f"  {k}: densessl {v['densessl_reference']}\n  {' ' * len(k)}  DINO     {v['dino']}")

    # 7. k-NN equality on the same features
    import eval_knn
    torch.manual_seed(0)
    train_f = torch.nn.functional.normalize(torch.randn(2000, 32), dim=1)
    test_f = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
    train_l = torch.randint(0, 10, (2000,))
    test_l = (test_f[:, :10].argmax(1) + torch.randint(0, 2, (500,))) % 10
    train_l = (train_f[:, :10].argmax(1))
    from train.knn import knn_classify
    ours_knn = knn_classify(train_f, train_l, test_f, test_l, k=20, temperature=0.07)
    theirs_knn = eval_knn.knn_classifier(train_f, train_l, test_f, test_l, 20, 0.07, num_classes=10)
    report["knn_same_features"] = {"densessl": ours_knn, "dino": list(theirs_knn)}
    print("== 7. k-NN on the same features: densessl", ours_knn, "DINO", theirs_knn)

    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
