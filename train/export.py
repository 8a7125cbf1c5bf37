"""`python -m train.export RUN_DIR_OR_CHECKPOINT out.safetensors`: the teacher backbone for timm.

Writes the teacher's timm VisionTransformer weights (no DINO heads, no classifier) as safetensors, with
the timm arguments in the file's metadata, and prints how to load it:

    kwargs = json.loads(safe_open(path, "pt").metadata()["timm_kwargs"])
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    # or: model = timm.create_model(arch, **kwargs); model.load_state_dict(safetensors.torch.load_file(path))

Decisions: the teacher (not the student) is exported, as DINO does (it is the better model);
`num_classes=0` in the kwargs because the file has no classifier (timm then keeps `head` an Identity
and `model(x)` returns the pooled cls feature); custom sizes (embed_dim, depth, heads, patch,
img_size) are part of the kwargs, so the tiny demo model loads the same way as a ViT-S.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from pipeline.arguments import OneLineParser
from train.restore import load_teacher, load_teacher_for_cli


def timm_kwargs(model_cfg) -> dict:
    """The `timm.create_model` keyword arguments that rebuild the backbone of `ModelConfig`."""
    kwargs = {"num_classes": 0, "img_size": model_cfg.img_size, "dynamic_img_size": True}
    for name in ("embed_dim", "depth", "num_heads", "patch_size"):
        if getattr(model_cfg, name):
            kwargs[name] = getattr(model_cfg, name)
    return kwargs


def export_teacher(path: str | Path, out: str | Path) -> dict:
    """Write the teacher backbone of a run/checkpoint to `out`; returns {"arch", "kwargs", "checkpoint"}."""
    return write_teacher(*load_teacher(path), out)


def write_teacher(config, teacher, checkpoint: Path, out: str | Path) -> dict:
    """Write a restored teacher's backbone (`train.restore.load_teacher`) to `out`; as `export_teacher`."""
    state = {name: tensor.detach().contiguous().float() for name, tensor in teacher.backbone.state_dict().items()}
    kwargs = timm_kwargs(config.model)
    metadata = {"arch": config.model.arch, "timm_kwargs": json.dumps(kwargs), "source": str(checkpoint),
                "format": "pt", "producer": "densessl train.export"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")  # never a half-written file under the final name
    try:
        save_file(state, str(partial), metadata=metadata)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return {"arch": config.model.arch, "kwargs": kwargs, "checkpoint": str(checkpoint)}


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="export", description="Export a run's teacher backbone as timm-loadable safetensors.")
    parser.add_argument("path", help="run folder (uses checkpoints/latest) or a checkpoint folder")
    parser.add_argument("out", help="output file, e.g. teacher.safetensors")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"export: {args.out} should end in .safetensors (timm picks the loader by extension)", file=sys.stderr)
        return 2
    folder = next((p for p in Path(args.out).parents if p.exists()), Path("."))
    if not folder.is_dir():
        print(f"export: cannot write {args.out}: {folder} is a file, not a folder", file=sys.stderr)
        return 2
    loaded = load_teacher_for_cli("export", args.path, "cpu")
    if loaded is None:  # a bad path or run config, already reported in one line
        return 2
    config, teacher, checkpoint, _ = loaded
    try:
        info = write_teacher(config, teacher, checkpoint, args.out)
    except OSError as error:  # an unwritable folder, a full disk: nothing is left under the name
        print(f"export: cannot write {args.out}: [Errno {error.errno}] {error.strerror}", file=sys.stderr)
        return 1
    kwargs = ", ".join(f"{k}={v!r}" for k, v in info["kwargs"].items())
    print(f"wrote {args.out} (teacher backbone of {info['checkpoint']})\n"
          f"load: timm.create_model({info['arch']!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={args.out!r}), {kwargs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
