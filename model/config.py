"""`MethodsConfig`: which losses run, their weights and hyperparameters (one sub-config per method).

The per-method dataclasses live next to their losses (`model/methods/*.py`); `ModelConfig` next to the
backbone. Defaults are the papers' (METHODS.md); a YAML preset only flips `enabled` and overrides a few.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from model.backbone import ModelConfig
from model.heads import HeadConfig
from model.methods.adclr import AdclrConfig
from model.methods.dino import DinoConfig
from model.methods.flsl import FlslConfig
from model.methods.ibot import IbotConfig
from model.methods.koleo import KoleoConfig
from model.methods.regioncl import RegionClConfig
from model.methods.selfpatch import SelfPatchConfig

METHOD_NAMES = ("dino", "adclr", "selfpatch", "regioncl", "flsl", "ibot", "koleo")

__all__ = ["MethodsConfig", "ModelConfig", "HeadConfig", "METHOD_NAMES"]


@dataclass
class MethodsConfig:
    head: HeadConfig = field(default_factory=HeadConfig)  # DINO head shared by cls / query / region / iBOT patch tokens
    dino: DinoConfig = field(default_factory=DinoConfig)  # image-level cls distillation (on by default)
    adclr: AdclrConfig = field(default_factory=AdclrConfig)  # query-token distillation
    selfpatch: SelfPatchConfig = field(default_factory=SelfPatchConfig)  # neighbour-aggregated patch term
    regioncl: RegionClConfig = field(default_factory=RegionClConfig)  # region-swap term
    flsl: FlslConfig = field(default_factory=FlslConfig)  # feature-level clustering terms
    ibot: IbotConfig = field(default_factory=IbotConfig)  # masked-patch distillation (iBOT / DINOv2; needs recipe.masks)
    koleo: KoleoConfig = field(default_factory=KoleoConfig)  # KoLeo regulariser of the image-level token (DINOv2)

    def enabled(self) -> list[str]:
        return [name for name in METHOD_NAMES if getattr(self, name).enabled]

    def reads_locals(self, teacher: bool) -> bool:
        """Whether a role's outputs of the local crops feed a loss: the student's for DINO, SelfPatch and FLSL,
        the teacher's for SelfPatch only (ADCLR, RegionCL, iBOT and KoLeo read global crops only)."""
        if teacher:
            return self.selfpatch.enabled
        return self.dino.enabled or self.selfpatch.enabled or self.flsl.enabled

    def validate(self, prefix: str = "methods") -> None:
        self.head.validate(f"{prefix}.head")
        for name in METHOD_NAMES:
            getattr(self, name).validate(f"{prefix}.{name}")
        if not self.enabled():
            raise ValueError(f"{prefix}: no method enabled; set one of {', '.join(f'{prefix}.{n}.enabled' for n in METHOD_NAMES)}")
        if self.koleo.enabled and self.enabled() == ["koleo"]:
            raise ValueError(f"{prefix}.koleo.enabled: KoLeo is a regulariser; enable a distillation term beside it "
                             f"(e.g. {prefix}.dino.enabled, as DINOv2)")
        if self.selfpatch.enabled and not self.dino.enabled:
            raise ValueError(f"{prefix}.selfpatch.enabled: needs {prefix}.dino.enabled (the aggregation module is trained through the DINO token)")
