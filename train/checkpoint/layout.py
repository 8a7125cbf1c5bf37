"""Where checkpoints are and which one a run resumes from: `step_XXXXXXXX` folders, `latest`, `COMPLETE`.

A checkpoint counts only once its `COMPLETE` file exists (written last, before the rename); `latest` names
the newest complete one. `find_checkpoint` resolves `checkpoint.resume` ("auto", "none" or a path);
`kept` says, for an error message, what a relaunch would resume from.
"""
from __future__ import annotations

from pathlib import Path

LATEST = "latest"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def kept(root: Path) -> str:
    """What a relaunch resumes from, for the error message."""
    name = latest_name(root)
    if name is None:
        return "no earlier checkpoint exists, so a relaunch starts from step 0"
    if not (root / name / "COMPLETE").is_file():
        return f"{root / LATEST} names {root / name}, which is incomplete; set checkpoint.resume to an older checkpoint"
    return f"the last complete checkpoint {root / name} is kept (latest); a relaunch resumes from it"


def latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def find_checkpoint(root: Path, resume: str) -> Path | None:
    """`resume`: "auto" (ROOT/latest if present), "none", or a checkpoint folder (or a run's checkpoints dir)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if (path / LATEST).is_file():
            path = path / (path / LATEST).read_text().strip()
        if not (path / "COMPLETE").is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no COMPLETE file)")
        return path
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    path = Path(root) / latest.read_text().strip()
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"{latest} names {path}, which is not a complete checkpoint")
    return path


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if (p / "COMPLETE").is_file())
