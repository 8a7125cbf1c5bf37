"""densessl's model: timm ViT with ADCLR query tokens and iBOT mask tokens, heads, and the methods as losses."""
from model.backbone import ModelConfig, build_backbone, forward_tokens
from model.config import METHOD_NAMES, MethodsConfig
from model.flops import StepShape, count_step_flops
from model.heads import DinoHead, HeadConfig, NeighbourAggregator
from model.losses import METHODS, LossState, SSLLosses, build_losses
from model.methods.adclr import AdclrConfig
from model.methods.dino import DinoConfig
from model.methods.flsl import FlslConfig
from model.methods.ibot import IbotConfig
from model.methods.koleo import KoleoConfig
from model.methods.regioncl import RegionClConfig
from model.methods.selfpatch import SelfPatchConfig
from model.ssl_model import SSLModel

__all__ = [
    "ModelConfig", "MethodsConfig", "HeadConfig", "DinoConfig", "AdclrConfig", "SelfPatchConfig",
    "RegionClConfig", "FlslConfig", "IbotConfig", "KoleoConfig", "SSLModel", "SSLLosses", "LossState", "build_losses", "METHODS",
    "METHOD_NAMES", "count_step_flops", "StepShape", "DinoHead", "NeighbourAggregator", "build_backbone",
    "forward_tokens",
]
