"""Checkpoints that resume a run exactly, written atomically; a save that fails keeps the previous one.

Layout under RUN_DIR/checkpoints/:

    latest                 one line: the name of the newest *complete* checkpoint
    step_00000120/
        engine/...         DeepSpeed `save_checkpoint` (student weights, fp32 master weights, AdamW
                           state; one optimizer shard per rank under ZeRO 1-3)
        trainer.pt         teacher, loss modules (centres), step, config (rank 0)
        rank_00000.pt      this rank's RNG states (python, numpy, torch CPU, CUDA) and the loader's state
                           ({"epoch", "samples"}: samples of the epoch's global order, alike on every rank)
        COMPLETE           written last, before the rename
        universal/         only after a resume on another world size or ZeRO stage: DeepSpeed's universal
                           checkpoint of engine/ (`universal`), made once, by one rename

Atomicity: everything goes to `.tmp-step_...` first; once every rank has written its files, rank 0
fsyncs them, writes COMPLETE, renames the folder to its final name, fsyncs the parent, and only then
replaces `latest` (write `latest.tmp`, fsync, `os.replace`). A crash at any point leaves `latest`
naming a complete checkpoint; half-written `.tmp-*` folders are removed by the next save. Keep-last-K
deletes the oldest complete checkpoints up to the new one, after it is in place.

Write failures (disk full, permissions, I/O errors in DeepSpeed's save, torch.save, fsync, rename):
the save has three phases (rank 0 makes the folder; every rank writes; rank 0 publishes), each ending
in `save._settle`, an all-gather of every rank's failure (None or one line) in place of a barrier. A rank
whose write failed thus still meets the others instead of raising past a collective they would wait
at until `collective_timeout_s`; then every rank raises the same `CheckpointWriteError` (path, cause,
rank, and the checkpoint a relaunch resumes from) and rank 0 removes the partial folder. DeepSpeed's
own save has barriers inside, so its writes are deferred (`save._deferred_write_errors`).

Decision: checkpoints live on a filesystem every rank can see (what DeepSpeed assumes for its own
checkpoints); every rank writes its own files, rank 0 alone renames and prunes.

Modules: `layout` (names, `latest`, finding a checkpoint to resume), `files` (durable atomic writes and
their one-line failures), `save` (the collective save and its phases), `resume` (loading a checkpoint
back, RNG states), `universal` (the conversion a resume on another world size or ZeRO stage loads). The
names below are the package's API.
"""
from train.checkpoint.layout import LATEST, checkpoint_name, find_checkpoint, list_checkpoints
from train.checkpoint.resume import CheckpointReadError, load_checkpoint, reseed_rng, restore_rng, rng_states
from train.checkpoint.save import CheckpointWriteError, save_checkpoint

__all__ = ["LATEST", "CheckpointReadError", "CheckpointWriteError", "checkpoint_name", "find_checkpoint", "list_checkpoints", "load_checkpoint",
           "reseed_rng", "restore_rng", "rng_states", "save_checkpoint"]
