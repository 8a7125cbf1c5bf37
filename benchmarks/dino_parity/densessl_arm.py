"""densessl at the recipe of configs/methods_table/dino.yaml, with DINO-side changes patched in from here.

    python3 benchmarks/dino_parity/densessl_arm.py --seed 0 --out RUN_DIR [--patch NAME ...]

Without `--patch` this is exactly
    python3 train/main.py --config configs/methods_table/dino.yaml seed=S run_dir=RUN_DIR log.progress_bar=false \
        eval.dense.train_path='' eval.dense.val_path=''
(the dense evaluation is off: only the k-NN is compared). Each `--patch` swaps one piece of densessl for
DINO's behaviour, by monkeypatching from this script (no product file is edited), to measure what that
difference costs:

- `global_clip`: DeepSpeed's one global-norm clip (`deepspeed.gradient_clipping_mode=global`), densessl's
  only clip before issue 26's fix; the product's default is now DINO's per-parameter clip (`train/clipping.py`).
- `per_param_clip`: until the fix, this patch wrapped the inner AdamW step with DINO's per-parameter clip
  (`deepspeed.gradient_clipping=0`, each fp32 master gradient scaled by min(1, 3 / (norm + 1e-6))); the
  product's `train.clipping.PerParameterClip` does the same arithmetic (same ops, same order), so the name
  now only sets `deepspeed.gradient_clipping_mode=per_parameter`.
- `dino_cls_init`: the cls token drawn as DINO's (trunc_normal std 0.02) instead of timm's (normal std 1e-6).
- `dino_pos_interp`: the positional embedding of a 16 px local view (2 x 2 patches) made as DINO's
  `interpolate_pos_encoding` (bicubic with scale_factor (w0 + 0.1) / sqrt(N), no antialias) instead of
  timm's `resample_abs_pos_embed` (bicubic to size, antialias=True).
- `ema_fp32`: the teacher EMA reads the student's fp32 master weights (as DINO's EMA reads its fp32
  student) instead of DeepSpeed's bf16 working copy.
- `freeze_skip`: DINO's last-layer freeze (the gradient dropped, so AdamW skips the parameters: no
  moments, no step count) instead of lr 0 (moments accumulate during the freeze).
- `fp32`: `deepspeed.bf16=false` (an override; listed for completeness).
Writes RUN_DIR/result.json (k-NN top-1/5 from metrics.jsonl, clip counts).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PATCHES = ("global_clip", "per_param_clip", "dino_cls_init", "dino_pos_interp", "ema_fp32", "freeze_skip", "fp32")


def master_params(engine) -> list[tuple[str, object, object]]:
    """(name, working parameter, the fp32 parameter the inner optimizer steps) of every trainable parameter.
    ZeRO-0 + bf16 in DeepSpeed 0.19.8 is `FP16_UnfusedOptimizer` (bf16 `fp16_groups`, fp32 `fp32_groups`;
    it copies each bf16 gradient into the fp32 copy's `.grad` right before the inner step); without bf16 the
    inner optimizer steps the module's own parameters."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
        return [(names[id(lp)], lp, hp) for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)]
    if hasattr(opt, "bf16_groups") or hasattr(opt, "bit16_groups"):
        raise SystemExit("densessl_arm: this DeepSpeed optimizer keeps flat fp32 partitions; the patches expect ZeRO-0")
    return [(n, p, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def inner_optimizer(engine):
    """The torch AdamW that DeepSpeed steps (its `step` is where DINO's clip / freeze act)."""
    opt = engine.optimizer
    return opt.optimizer if hasattr(opt, "fp32_groups") else opt


def patch_freeze_skip() -> None:
    """While frozen, the last-layer parameters' fp32 gradients are dropped before AdamW, which then skips
    them (no moments, no step count), as DINO's `cancel_gradients_last_layer` (after the clip)."""
    import train.engine as engine_module
    import train.step as step_module

    build = engine_module.build_student_engine
    frozen = {"now": False}
    apply_schedule = step_module.apply_schedule

    def apply(engine, kinds, values):
        frozen["now"] = values["freeze_last_layer"]
        apply_schedule(engine, kinds, values)

    step_module.apply_schedule = apply

    def build_student_engine(cfg, student, *args, **kwargs):
        engine, kinds, config, clip = build(cfg, student, *args, **kwargs)
        last = [hp for name, _, hp in master_params(engine) if "last_layer" in name]
        inner = inner_optimizer(engine)
        inner_step = inner.step  # the product's per-parameter clip + AdamW: dropped gradients are neither clipped nor stepped

        def step(*a, **k):
            if frozen["now"]:
                for hp in last:
                    hp.grad = None
            return inner_step(*a, **k)

        inner.step = step
        return engine, kinds, config, clip

    engine_module.build_student_engine = build_student_engine


def patch_dino_cls_init() -> None:
    import torch

    import model.ssl_model as ssl_model

    build = ssl_model.build_backbone

    def build_backbone(cfg):
        vit = build(cfg)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(vit.cls_token, std=0.02, a=-2.0, b=2.0)  # DINO: utils.trunc_normal_(std=.02)
        return vit

    ssl_model.build_backbone = build_backbone


def dino_resample_abs_pos_embed(posemb, new_size, old_size=None, num_prefix_tokens=1, interpolation="bicubic",
                                antialias=True, verbose=False, align_corners=None):
    """DINO's `VisionTransformer.interpolate_pos_encoding`, in timm's `resample_abs_pos_embed` signature."""
    import torch
    from torch import nn

    npatch = new_size[0] * new_size[1]
    N = posemb.shape[1] - num_prefix_tokens
    if npatch == N and new_size[0] == new_size[1]:
        return posemb
    class_pos_embed = posemb[:, :num_prefix_tokens]
    patch_pos_embed = posemb[:, num_prefix_tokens:]
    dim = posemb.shape[-1]
    h0, w0 = new_size[0] + 0.1, new_size[1] + 0.1
    side = int(math.sqrt(N))
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2),
        scale_factor=(h0 / math.sqrt(N), w0 / math.sqrt(N)), mode="bicubic")
    assert int(h0) == patch_pos_embed.shape[-2] and int(w0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat((class_pos_embed, patch_pos_embed), dim=1)


def patch_dino_pos_interp() -> None:
    import timm.models.vision_transformer as tvit

    tvit.resample_abs_pos_embed = dino_resample_abs_pos_embed


def patch_ema_fp32() -> None:
    import torch

    import train.engine as engine_module
    import train.step as step_module

    masters = {}
    build = engine_module.build_student_engine

    def build_student_engine(cfg, student, *args, **kwargs):
        engine, kinds, config, clip = build(cfg, student, *args, **kwargs)
        masters.update({id(lp): hp for _, lp, hp in master_params(engine)})
        return engine, kinds, config, clip

    engine_module.build_student_engine = build_student_engine

    @torch.no_grad()
    def update_teacher(student, teacher, momentum, zero_stage):
        for p, t in zip(student.parameters(), teacher.parameters()):
            source = masters.get(id(p), p)  # the fp32 master copy the optimizer stepped
            t.mul_(momentum).add_(source.detach().float(), alpha=1.0 - momentum)

    step_module.update_teacher = update_teacher


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--patch", action="append", default=[], choices=PATCHES)
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = parser.parse_args(argv)
    overrides = [f"seed={args.seed}", f"run_dir={args.out}", "log.progress_bar=false",
                 "eval.dense.train_path=''", "eval.dense.val_path=''"]
    if "global_clip" in args.patch and "per_param_clip" in args.patch:
        parser.error("--patch global_clip and --patch per_param_clip exclude each other")
    if "global_clip" in args.patch:
        overrides.append("deepspeed.gradient_clipping_mode=global")
    if "per_param_clip" in args.patch:
        overrides.append("deepspeed.gradient_clipping_mode=per_parameter")
    if "fp32" in args.patch:
        overrides.append("deepspeed.bf16=false")
    # the engine patches wrap build_student_engine; each applies to the engine it returns
    for name in ("freeze_skip", "dino_cls_init", "dino_pos_interp", "ema_fp32"):
        if name in args.patch:
            globals()[f"patch_{name}"]()
    from train.main import main as train_main

    code = train_main(["--config", str(ROOT / "configs/methods_table/dino.yaml"), *overrides, *args.overrides])
    if code != 0:
        return code
    records = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    knn = [r for r in records if r.get("kind") == "eval" and "knn_top1" in r][-1]
    train_records = [r for r in records if r.get("kind") == "train"]
    last = train_records[-1]
    result = {"seed": args.seed, "patches": args.patch, "overrides": args.overrides,
              "knn_top1": knn["knn_top1"], "knn_top5": knn["knn_top5"],
              "target_entropy": last.get("dino/target_entropy"), "prototypes_in_use": last.get("dino/prototypes_in_use"),
              "clipped_parameters_per_step": [r["clipped_parameters"] for r in train_records if "clipped_parameters" in r]}
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
