"""Durable, atomic file writes for checkpoints, and their failures as one line naming the path and the cause.

`writing(path)` turns an OSError (or torch.save's errno-less RuntimeError) into `WriteFailed("cannot write
PATH: [Errno 28] No space left on device")`; `attempt(action, ...)` returns that line instead of raising, so
the save can agree on failures across ranks before raising (`train.checkpoint.save`). `write_object`
torch-saves and fsyncs; `write_text` replaces a small file atomically; `fsync_tree` / `fsync_dir` make a
folder durable before it is renamed into place.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


class WriteFailed(Exception):
    """A write of this rank failed (message: what and why); becomes CheckpointWriteError once agreed on."""


@contextlib.contextmanager
def writing(path: Path):
    try:
        yield
    except (OSError, RuntimeError) as error:  # torch.save reports some write failures as RuntimeError
        raise WriteFailed(f"cannot write {path}: {cause(error)}") from error


def cause(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def attempt(action, *args) -> str | None:
    """Run a write step; its failure as a one-line description, or None."""
    try:
        action(*args)
    except WriteFailed as failure:
        return str(failure)
    return None


def write_object(path: Path, obj) -> None:
    with writing(path):
        save_to_file(torch.save, obj, path)


def save_to_file(save, obj, path) -> None:
    """`save(obj, file)` into `path`, then fsync. torch.save swallows the OSError of a failed write and
    raises an errno-less RuntimeError ("unexpected pos 509504 vs 509456") in place of "No space left on
    device"; the file it is handed keeps that OSError, which is raised instead."""
    with open(path, "wb") as f:
        sink = _KeepWriteError(f)
        try:
            save(obj, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None
        f.flush()
        os.fsync(f.fileno())


class _KeepWriteError:
    """The file-like object torch.save writes to: remembers the OSError of a failed write."""

    def __init__(self, file):
        self.file, self.name, self.error = file, file.name, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.file.flush()


def write_text(path: Path, text: str) -> None:
    """Atomic replace: write a sibling temp file, fsync it, rename over `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            with writing(Path(path)):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with writing(Path(directory)):
            fsync_dir(Path(directory))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
