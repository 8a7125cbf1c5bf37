"""`CollapseMonitor`: a one-line warning when a distillation term collapses, from the logged figures.

Every distillation term (dino, adclr, selfpatch, regioncl, flsl, ibot) logs on log steps, from the teacher's
target rows p_t over K prototypes (`model/methods/common.py`): `<term>/target_entropy` (mean row
entropy, nats), `<term>/prototypes_in_use` (exp of the entropy of the batch-mean target) and
`<term>/kl`. The two ways a self-distillation term collapses (DINO, section 5.3 of the paper):
- one prototype dominates: every image gets the same target. `prototypes_in_use < 2` on a log step is
  reported at once. Centring (a lower `center_momentum` centres faster), a higher teacher temperature
  (less sharpening) and a lower weight of the term counter it.
- uniform targets: every row is flat, the student learns nothing. Row entropy within 1% of log K on
  every log step for 1,000 steps is reported. Sharpening (a lower teacher temperature), slower centring
  (a higher `center_momentum`) and a lower weight counter it.
FLSL has no centre: its knobs are the teacher temperature, `vmr_weight` (its volume-maximisation term
keeps prototypes in use; it also flattens the mean) and the weight.

A term warns once per episode: again only after its figures have left the collapsed region. The state is
not checkpointed: after a resume the 1,000-step count starts again (a late warning, never a false one).
Call it on rank 0 with the logged (rank-averaged) values; the figures are identical on every rank.
"""
from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

UNIFORM_MARGIN = 0.01  # row entropy >= (1 - margin) log K counts as uniform
UNIFORM_PATIENCE_STEPS = 1000  # ... for this many steps before a warning
MIN_PROTOTYPES = 2.0  # fewer prototypes in use is a collapse onto one


def prototype_counts(methods_cfg) -> dict[str, int]:
    """K of every enabled distillation term: the shared DINO head's for dino/adclr/regioncl (and ibot unless
    `separate_head`), their own heads' for selfpatch, flsl and a separate-head ibot. KoLeo is a regulariser
    (no targets, no figures)."""
    ibot = methods_cfg.ibot
    own = {"selfpatch": methods_cfg.selfpatch.out_dim, "flsl": methods_cfg.flsl.out_dim,
           "ibot": ibot.out_dim if ibot.separate_head else methods_cfg.head.out_dim}
    return {name: own.get(name, methods_cfg.head.out_dim) for name in methods_cfg.enabled() if name != "koleo"}


class CollapseMonitor:
    def __init__(self, num_prototypes: dict[str, int], patience_steps: int = UNIFORM_PATIENCE_STEPS):
        self.num_prototypes = dict(num_prototypes)
        self.patience_steps = patience_steps
        self.uniform_since: dict[str, int] = {}  # term -> first log step of the current uniform stretch
        self.warned: dict[str, set[str]] = {term: set() for term in num_prototypes}  # kinds warned this episode

    @classmethod
    def from_methods(cls, methods_cfg, patience_steps: int = UNIFORM_PATIENCE_STEPS) -> "CollapseMonitor":
        return cls(prototype_counts(methods_cfg), patience_steps)

    def update(self, step: int, values: dict[str, float]) -> list[str]:
        """Feed one log step's values (the metrics record); logs and returns the warnings it raised now."""
        warnings = []
        for term, count in self.num_prototypes.items():
            entropy, in_use = values.get(f"{term}/target_entropy"), values.get(f"{term}/prototypes_in_use")
            if entropy is None or in_use is None:
                continue
            if self._starts(term, "dominant", in_use < MIN_PROTOTYPES):
                warnings.append(self._dominant_message(term, step, in_use, entropy, count))
            uniform = entropy >= (1.0 - UNIFORM_MARGIN) * math.log(count)
            start = self.uniform_since.setdefault(term, step) if uniform else self.uniform_since.pop(term, None)
            if self._starts(term, "uniform", uniform and step - start >= self.patience_steps):
                warnings.append(self._uniform_message(term, step, start, entropy, count))
        for message in warnings:
            logger.warning("%s", message)
        return warnings

    def _starts(self, term: str, kind: str, collapsed: bool) -> bool:
        """True the first step `collapsed` holds in an episode; the episode ends when it stops holding."""
        if not collapsed:
            self.warned[term].discard(kind)
            return False
        if kind in self.warned[term]:
            return False
        self.warned[term].add(kind)
        return True

    def _dominant_message(self, term: str, step: int, in_use: float, entropy: float, count: int) -> str:
        return (f"collapse: {term} targets use {in_use:.2f} of {count} prototypes at step {step} (one prototype "
                f"dominates; row entropy {entropy:.3f} nats). Usually helps: {_knobs(term, 'dominant')}")

    def _uniform_message(self, term: str, step: int, start: int, entropy: float, count: int) -> str:
        return (f"collapse: {term} targets are uniform since step {start} (row entropy {entropy:.3f} of "
                f"log K = {math.log(count):.3f} nats at step {step}). Usually helps: {_knobs(term, 'uniform')}")


def _knobs(term: str, kind: str) -> str:
    """The config knobs that counter each kind of collapse of `term`."""
    key = f"methods.{term}"
    if term == "flsl":
        if kind == "dominant":
            return f"raise {key}.vmr_weight (keeps prototypes in use), raise {key}.teacher_temp, lower {key}.weight"
        return f"lower {key}.teacher_temp / {key}.warmup_teacher_temp (sharper targets), lower {key}.vmr_weight, lower {key}.weight"
    if kind == "dominant":
        return (f"lower {key}.center_momentum (faster centring), raise {key}.teacher_temp (less sharpening), "
                f"lower {key}.weight")
    return (f"lower {key}.teacher_temp / {key}.warmup_teacher_temp (sharper targets), raise {key}.center_momentum "
            f"(slower centring), lower {key}.weight")
