"""`train_step`: one optimizer step of any method mix; it knows no method.

teacher forward (no grad, bf16 autocast on an fp32 teacher) -> student forward (the DeepSpeed engine)
-> `teacher.complete_teacher(...)` (same no grad / autocast: the teacher targets that need the student's
tokens, e.g. FLSL's; the teacher's dict unchanged for other methods) -> `losses(...)` (the weighted sum
+ detached parts; centres update inside) -> backward -> step -> teacher EMA. Nothing here reads a
tensor back to the host: the loss parts stay on the device and the caller syncs only on log steps.
`nonfinite` accumulates on the device whether any loss so far was NaN/inf, so the check costs no sync
until the caller looks. `timer` (a `train.telemetry.PhaseTimer`) marks the two phases with device
events: forward + backward, then optimizer step + EMA.
"""
from __future__ import annotations

import contextlib

import torch

from model import LossState
from train.engine import apply_schedule, update_teacher


def teacher_autocast(device: torch.device, bf16: bool):
    """bf16 autocast for the fp32 teacher when the run is bf16, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_step(engine, group_kinds, teacher, losses, views, state: LossState, values: dict, *, bf16: bool, zero_stage: int,
               timer=None):
    """One step with the schedule `values` (lr, weight_decay, teacher_momentum, freeze_last_layer).

    Returns the loss dict (device tensors: "loss" detached, and each part).
    """
    if timer is not None:
        timer.start()
    apply_schedule(engine, group_kinds, values)
    with torch.no_grad(), teacher_autocast(views.device, bf16):
        teacher_out = teacher(views, role="teacher")
    student_out = engine(views, role="student")
    with torch.no_grad(), teacher_autocast(views.device, bf16):
        teacher_out = teacher.complete_teacher(teacher_out, student_out)
    loss_parts = losses(student_out, teacher_out, views, state)
    engine.backward(loss_parts["loss"])
    if timer is not None:
        timer.mark("forward_backward")
    engine.step()
    update_teacher(engine.module, teacher, values["teacher_momentum"], zero_stage)
    if timer is not None:
        timer.mark("optimizer")
    return {name: value.detach() for name, value in loss_parts.items()}
