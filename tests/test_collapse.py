"""CollapseMonitor on synthetic logged values: which sequences warn, when, once, and naming what."""
import logging
import math

from model import MethodsConfig
from train.collapse import CollapseMonitor, prototype_counts

K = 256
HEALTHY = {"dino/target_entropy": 2.0, "dino/prototypes_in_use": 90.0, "dino/kl": 0.5}


def figures(term="dino", entropy=2.0, in_use=90.0):
    return {f"{term}/target_entropy": entropy, f"{term}/prototypes_in_use": in_use, f"{term}/kl": 0.1}


def test_prototype_counts_follow_each_terms_head():
    methods = MethodsConfig()
    methods.head.out_dim, methods.selfpatch.out_dim, methods.flsl.out_dim = 1000, 300, 200
    for name in ("adclr", "selfpatch", "regioncl", "flsl"):
        getattr(methods, name).enabled = True
    assert prototype_counts(methods) == {"dino": 1000, "adclr": 1000, "selfpatch": 300, "regioncl": 1000, "flsl": 200}
    methods.adclr.enabled = False
    assert "adclr" not in CollapseMonitor.from_methods(methods).num_prototypes
    methods.ibot.enabled = methods.koleo.enabled = True  # iBOT on the shared head; KoLeo has no targets
    assert prototype_counts(methods)["ibot"] == 1000 and "koleo" not in prototype_counts(methods)
    methods.ibot.separate_head, methods.ibot.out_dim = True, 500
    assert prototype_counts(methods)["ibot"] == 500


def test_one_prototype_warns_at_once_and_once_per_episode(caplog):
    monitor = CollapseMonitor({"dino": K, "adclr": K})
    assert monitor.update(50, {**HEALTHY, **figures("adclr", in_use=40.0)}) == []
    with caplog.at_level(logging.WARNING, logger="train.collapse"):
        warned = monitor.update(100, {**HEALTHY, **figures("adclr", entropy=0.01, in_use=1.3)})
    assert len(warned) == 1 and caplog.messages == warned
    message = warned[0]
    assert "\n" not in message and message.startswith("collapse: adclr targets use 1.30 of 256 prototypes at step 100")
    for knob in ("methods.adclr.center_momentum", "methods.adclr.teacher_temp", "methods.adclr.weight"):
        assert knob in message
    assert monitor.update(150, figures("adclr", in_use=1.9)) == []  # same episode: no repeat
    assert monitor.update(200, figures("adclr", in_use=2.0)) == []  # recovered: 2 is not < 2
    assert len(monitor.update(250, figures("adclr", in_use=1.5))) == 1  # a new episode warns again


def test_uniform_targets_warn_after_1000_steps_within_one_percent_of_log_k():
    monitor = CollapseMonitor({"dino": K})
    flat = 0.995 * math.log(K)  # within 1% of log K
    for step in range(100, 1100, 100):  # 100 .. 1000: uniform for 900 steps, not yet
        assert monitor.update(step, figures(entropy=flat, in_use=K)) == [], step
    warned = monitor.update(1100, figures(entropy=flat, in_use=K))
    assert len(warned) == 1 and "dino targets are uniform since step 100" in warned[0]
    assert "lower methods.dino.teacher_temp" in warned[0] and "raise methods.dino.center_momentum" in warned[0]
    assert monitor.update(1200, figures(entropy=flat, in_use=K)) == []


def test_a_stretch_broken_by_one_sharper_step_starts_over():
    monitor = CollapseMonitor({"dino": K}, patience_steps=1000)
    flat, sharper = 0.995 * math.log(K), 0.985 * math.log(K)  # 1.5% below log K breaks the stretch
    for step in range(0, 1000, 100):
        monitor.update(step, figures(entropy=flat, in_use=K))
    monitor.update(1000, figures(entropy=sharper, in_use=K))
    for step in range(1100, 2100, 100):
        assert monitor.update(step, figures(entropy=flat, in_use=K)) == [], step
    assert len(monitor.update(2100, figures(entropy=flat, in_use=K))) == 1


def test_flsl_names_its_own_knobs_and_missing_figures_are_skipped():
    monitor = CollapseMonitor({"flsl": 64, "dino": K})
    warned = monitor.update(10, figures("flsl", entropy=0.0, in_use=1.0))  # dino figures absent: not a step with stats
    assert len(warned) == 1 and "methods.flsl.vmr_weight" in warned[0] and "center_momentum" not in warned[0]


# The exact lines a user reads (mutation testing, issue 25: a swapped hint or a wrong step passed the
# substring checks above). One full message per term family and kind.
def test_the_four_messages_word_for_word():
    monitor = CollapseMonitor({"dino": K, "flsl": 64}, patience_steps=100)
    assert monitor.update(7, {**figures("dino", entropy=0.01, in_use=1.25), **figures("flsl", entropy=0.02, in_use=1.5)}) == [
        "collapse: dino targets use 1.25 of 256 prototypes at step 7 (one prototype dominates; row entropy 0.010 "
        "nats). Usually helps: lower methods.dino.center_momentum (faster centring), raise methods.dino.teacher_temp "
        "(less sharpening), lower methods.dino.weight",
        "collapse: flsl targets use 1.50 of 64 prototypes at step 7 (one prototype dominates; row entropy 0.020 "
        "nats). Usually helps: raise methods.flsl.vmr_weight (keeps prototypes in use), raise "
        "methods.flsl.teacher_temp, lower methods.flsl.weight",
    ]
    flat = {**figures("dino", entropy=5.5, in_use=K), **figures("flsl", entropy=4.16, in_use=64)}
    assert monitor.update(200, flat) == []
    assert monitor.update(300, flat) == [
        "collapse: dino targets are uniform since step 200 (row entropy 5.500 of log K = 5.545 nats at step 300). "
        "Usually helps: lower methods.dino.teacher_temp / methods.dino.warmup_teacher_temp (sharper targets), raise "
        "methods.dino.center_momentum (slower centring), lower methods.dino.weight",
        "collapse: flsl targets are uniform since step 200 (row entropy 4.160 of log K = 4.159 nats at step 300). "
        "Usually helps: lower methods.flsl.teacher_temp / methods.flsl.warmup_teacher_temp (sharper targets), lower "
        "methods.flsl.vmr_weight, lower methods.flsl.weight",
    ]


def test_entropy_exactly_at_the_margin_counts_as_uniform():
    from train.collapse import UNIFORM_MARGIN

    edge = (1.0 - UNIFORM_MARGIN) * math.log(K)  # the boundary itself: `>=`, not `>`
    monitor = CollapseMonitor({"dino": K}, patience_steps=100)
    assert monitor.update(0, figures(entropy=edge, in_use=K)) == []
    assert len(monitor.update(100, figures(entropy=edge, in_use=K))) == 1
    below = CollapseMonitor({"dino": K}, patience_steps=100)
    for step in (0, 100, 200):
        assert below.update(step, figures(entropy=math.nextafter(edge, 0.0), in_use=K)) == []


def test_from_methods_keeps_the_patience_it_is_given():
    methods = MethodsConfig()
    monitor = CollapseMonitor.from_methods(methods, patience_steps=50)
    assert monitor.patience_steps == 50
    flat = 0.995 * math.log(methods.head.out_dim)
    assert monitor.update(0, figures(entropy=flat, in_use=10.0)) == []
    assert len(monitor.update(50, figures(entropy=flat, in_use=10.0))) == 1  # 50 steps, not the default 1,000


def test_a_term_that_logs_only_one_of_its_two_figures_is_skipped():
    monitor = CollapseMonitor({"dino": K})
    assert monitor.update(10, {"dino/target_entropy": 0.0}) == []  # no prototypes_in_use: no comparison with None
    assert monitor.update(20, {"dino/prototypes_in_use": 1.0}) == []
