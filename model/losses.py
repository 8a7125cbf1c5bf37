"""`build_losses`: the weighted sum of the enabled methods' losses, one module per method (dino, adclr,
selfpatch, regioncl, flsl, ibot, koleo).

loss = sum over enabled methods m of methods_cfg.m.weight * part_m, where part_m is what the method
module returns under its own name (FLSL's is already its internally weighted 0.03 L_ms + L_km + 5 VMR).
Every part (and FLSL's sub-terms) comes back detached for logging; `loss` keeps the graph. Each module
updates its centre buffer inside its forward, after computing its loss (so the loss uses the centre of
the previous step, as DINO does).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from model.backbone import ModelConfig
from model.config import MethodsConfig
from model.methods.adclr import AdclrLoss
from model.methods.dino import DinoLoss
from model.methods.flsl import FlslLoss
from model.methods.ibot import IbotLoss
from model.methods.koleo import KoleoLoss
from model.methods.regioncl import RegionClLoss
from model.methods.selfpatch import SelfPatchLoss

METHODS = {
    "dino": lambda cfg: DinoLoss(cfg.dino, cfg.head.out_dim),
    "adclr": lambda cfg: AdclrLoss(cfg.adclr, cfg.head.out_dim),
    "selfpatch": lambda cfg: SelfPatchLoss(cfg.selfpatch),
    "regioncl": lambda cfg: RegionClLoss(cfg.regioncl, cfg.head.out_dim),
    "flsl": lambda cfg: FlslLoss(cfg.flsl),
    "ibot": lambda cfg: IbotLoss(cfg.ibot, cfg.ibot.out_dim if cfg.ibot.separate_head else cfg.head.out_dim),
    "koleo": lambda cfg: KoleoLoss(cfg.koleo),
}


@dataclass
class LossState:
    epoch: float = 0.0  # fractional epoch (step / steps_per_epoch): drives the temperature warm-ups
    step: int = 0  # global optimizer step
    collect_stats: bool = False  # also return collapse statistics this step (the trainer sets it on log steps)


class SSLLosses(nn.Module):
    def __init__(self, methods_cfg: MethodsConfig):
        super().__init__()
        methods_cfg.validate()
        self.methods_cfg = methods_cfg
        self.parts = nn.ModuleDict({name: METHODS[name](methods_cfg) for name in methods_cfg.enabled()})

    def forward(self, student_out: dict, teacher_out: dict, views, state: LossState) -> dict[str, Tensor]:
        total = None
        logged: dict[str, Tensor] = {}
        for name, module in self.parts.items():
            parts = module(student_out, teacher_out, views, state)
            weighted = getattr(self.methods_cfg, name).weight * parts[name]
            total = weighted if total is None else total + weighted
            logged.update({key: value.detach() for key, value in parts.items()})
        return {"loss": total, **logged}

    def teacher_temperatures(self, epoch: float) -> dict[str, float]:
        """tau_t of every enabled term that has a teacher (KoLeo has none)."""
        configs = {name: getattr(self.methods_cfg, name) for name in self.parts}
        return {name: cfg.teacher_temperature(epoch) for name, cfg in configs.items() if hasattr(cfg, "teacher_temperature")}


def build_losses(methods_cfg: MethodsConfig, model_cfg: ModelConfig | None = None) -> SSLLosses:
    """The loss module for the enabled methods (`model_cfg` is accepted for the shared call shape)."""
    return SSLLosses(methods_cfg)
