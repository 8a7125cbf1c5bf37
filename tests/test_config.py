"""The trainer's config: YAML presets with `extends:`, dotted overrides, clear errors, the saved run config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import imagefactory

from test_train_support import tiny_config, write_tiny_config
from pipeline.recipe import recipe_preset
from train.config import load_config, save_config
from train.dataclass_yaml import ConfigError, apply_override, build, load_yaml_chain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class Inner:
    rate: float = 0.5  # a float
    pair: tuple[float, float] = (0.1, 1.0)  # a pair
    name: str = "x"  # a string


@dataclass
class Outer:
    count: int = 3  # an int
    flag: bool = False  # a bool
    inner: Inner = field(default_factory=lambda: Inner(rate=0.25))  # nested, non-default factory
    maybe: int | None = None  # optional


def test_build_applies_only_the_given_keys_and_keeps_factory_defaults():
    built = build(Outer, {"count": 7, "inner": {"pair": [0.2, 0.9]}})
    assert built == Outer(count=7, inner=Inner(rate=0.25, pair=(0.2, 0.9)))
    assert isinstance(built.inner.pair, tuple)
    assert build(Outer, {"inner": {"rate": 1}}).inner.rate == 1.0  # an int is fine for a float
    assert build(Outer, {"maybe": None}).maybe is None and build(Outer, {"maybe": 4}).maybe == 4


@pytest.mark.parametrize("tree, message", [
    ({"inner": {"rat": 1.0}}, "inner.rat: unknown config key"),
    ({"count": "3"}, "count: expected int, got str"),
    ({"count": 2.5}, "count: expected int, got float"),
    ({"flag": 1}, "flag: expected bool, got int"),
    ({"inner": {"pair": [0.1]}}, "inner.pair: expected 2 values"),
    ({"inner": {"name": 5}}, "inner.name: expected str"),
    ({"inner": 3}, "inner: expected a mapping"),
])
def test_build_errors_name_the_dotted_key(tree, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build(Outer, tree)


def test_overrides_parse_yaml_values():
    tree = apply_override({"inner": {"rate": 0.1}}, "inner.pair=[0.3, 0.4]")
    tree = apply_override(tree, "flag=true")
    tree = apply_override(tree, "maybe=null")
    assert build(Outer, tree) == Outer(flag=True, inner=Inner(rate=0.1, pair=(0.3, 0.4)))
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "flag")


def test_floats_written_with_an_exponent_are_floats():
    """YAML 1.1 (PyYAML) reads `1e-12` (no dot) as a string; a float field takes it as the number it is."""
    tree = apply_override(apply_override({}, "inner.rate=1e-12"), "inner.pair=[2E3, -1.5e+2]")
    assert build(Outer, tree).inner == Inner(rate=1e-12, pair=(2000.0, -150.0))
    with pytest.raises(ConfigError, match=r"inner\.rate: expected float, got str '1e'"):
        build(Outer, apply_override({}, "inner.rate=1e"))
    with pytest.raises(ConfigError, match=r"name: expected str"):  # only float fields convert
        build(Outer, {"inner": {"name": 1e-3}})


def test_extends_merges_parent_first(tmp_path):
    (tmp_path / "base.yaml").write_text("count: 1\ninner: {rate: 0.7, name: base}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ninner: {name: child}\n")
    assert build(Outer, load_yaml_chain(tmp_path / "child.yaml")) == Outer(count=1, inner=Inner(rate=0.7, name="child"))
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml_chain(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml_chain(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text, message", [
    ("run_dir: x\nmodel:\n\tdepth: 2\n", "line 3, column 1: found character '\\t' that cannot start any token "
                                         "(YAML indents with spaces, never tabs)"),
    ("run_dir: [x\n", "line 2, column 1: expected ',' or ']', but got '<stream end>'"),
    ("model: {depth: 2\nseed: 1\n", "line 2, column 5: expected ',' or '}', but got ':'"),
])
def test_a_yaml_mistake_is_one_config_error_line_with_its_place(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load_yaml_chain(tmp_path / "bad.yaml")
    assert str(error.value) == f"{tmp_path / 'bad.yaml'}: not valid YAML at {message}"


def test_train_config_errors_name_the_key(tmp_path):
    path = write_tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run")
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown config key"):
        load_config(path, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, got str"):
        load_config(path, ["data.batch_size=four"])
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: must be 0-3"):
        load_config(path, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"recipe\.patch_size: 16 differs from the model's patch size 8"):
        load_config(path, ["recipe.patch_size=16", "recipe.queries.size=16"])
    with pytest.raises(ConfigError, match=r"data\.dtype: must be 'float32' when deepspeed\.bf16 is False"):
        load_config(path, ["deepspeed.bf16=false"])
    with pytest.raises(ConfigError, match=r"^methods\.adclr\.weight: must be >= 0, got -1\.0$"):  # from the section's validate()
        load_config(path, ["methods.adclr.weight=-1"])
    with pytest.raises(ConfigError, match=r"^data\.batch_size: must be positive, got 0$"):
        load_config(path, ["data.batch_size=0"])


@pytest.mark.parametrize("override, message", [
    ("data.canvas_size=4", r"^data\.canvas_size: 4 px is smaller than the global crops \(32 px\)"),
    ("data.canvas_size=32", None),  # the boundary: a canvas of the crops' own size is fine
    ("optim.min_lr=-0.000001", r"^optim\.min_lr: must be a finite number >= 0, got -1e-06$"),
    ("optim.weight_decay=-0.04", r"^optim\.weight_decay: must be a finite number >= 0, got -0\.04$"),
    ("optim.weight_decay_end=-1", r"^optim\.weight_decay_end: must be a finite number >= 0"),
    ("optim.warmup_epochs=-1", r"^optim\.warmup_epochs: must be a finite number >= 0"),
    ("optim.lr_absolute=.inf", r"^optim\.lr_absolute: must be a finite number >= 0, got inf$"),
    ("optim.betas=[0.9,1.0]", r"^optim\.betas: must be two numbers in \[0, 1\), got \[0\.9, 1\.0\]$"),
    ("optim.eps=0", r"^optim\.eps: must be a finite number > 0, got 0"),
    ("deepspeed.gradient_clipping=-3", r"^deepspeed\.gradient_clipping: must be >= 0 \(0 = off\), got -3"),
    ("model.num_heads=3", r"^model\.num_heads: 3 heads do not divide the width 64 \(model\.embed_dim or "
                          r"vit_tiny_patch16_224's\); use a divisor, e\.g\. 1, 2, 4, 8$"),
    ("model.embed_dim=0", None),  # the arch's own width, 192, over 2 heads is fine
])
def test_nonsense_values_are_refused_naming_the_key(tmp_path, override, message):
    """Values that used to train without an error (4 px canvases, a negative weight decay) or die deep in
    timm (heads not dividing the width): one ConfigError line naming the key."""
    path = write_tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run")
    if message is None:
        assert load_config(path, [override]).validate()
        return
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_main_reports_config_errors_without_traceback(tmp_path, capsys):
    from train.main import main

    path = write_tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run")
    assert main(["--config", str(path), "optim.bogus=1", "--local_rank=0"]) == 2
    assert "config error: optim.bogus: unknown config key" in capsys.readouterr().err


def test_recipe_preset_by_name_then_overrides(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run",
                         recipe={"preset": "adclr", "global_views": {"size": 32}})
    assert config.recipe.queries.count == 10  # from the adclr preset
    assert config.recipe.global_views.size == 32 and config.recipe.local_views.size == 16
    with pytest.raises(ConfigError, match=r"recipe\.preset: .*unknown"):
        tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run2", recipe={"preset": "simclr"})


def test_saved_config_reloads_identically(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run", ["methods.adclr.enabled=true", "recipe.queries.count=3"])
    saved = save_config(config, tmp_path / "run")
    assert load_config(saved) == config
    assert yaml.safe_load(saved.read_text())["recipe"]["queries"]["count"] == 3


def test_overlay_presets_stack_in_order():
    config = load_config([CONFIGS / "adclr_vit_b16.yaml", CONFIGS / "zero3.yaml"], ["data.path=/x.beton"])
    assert config.deepspeed.zero_stage == 3 and config.model.arch == "vit_base_patch16_224"
    assert config.methods.adclr.enabled and config.recipe.queries.count == 10  # from adclr_vit_s16 via extends
    assert config.optim.lr == 0.00075 and config.deepspeed.gradient_clipping == 0.3


SHIPPED = {  # preset: (arch, enabled methods, ZeRO stage, queries per image, swaps, nested crops, global crop px, epochs)
    "dino_vit_s16.yaml": ("vit_small_patch16_224", ["dino"], 2, 0, False, False, 224, 100),
    "adclr_vit_s16.yaml": ("vit_small_patch16_224", ["dino", "adclr"], 2, 10, False, False, 224, 100),
    "adclr_vit_b16.yaml": ("vit_base_patch16_224", ["dino", "adclr"], 2, 10, False, False, 224, 100),
    "selfpatch_vit_s16.yaml": ("vit_small_patch16_224", ["dino", "selfpatch"], 2, 0, False, False, 224, 200),
    "regioncl_vit_s16.yaml": ("vit_small_patch16_224", ["dino", "regioncl"], 2, 0, True, False, 224, 100),
    "flsl_vit_s16.yaml": ("vit_small_patch16_224", ["flsl"], 2, 0, False, True, 224, 300),
    "ibot_vit_s16.yaml": ("vit_small_patch16_224", ["dino", "ibot"], 2, 0, False, False, 224, 100),
    "dinov2_vit_s16.yaml": ("vit_small_patch16_224", ["dino", "ibot", "koleo"], 2, 0, False, False, 224, 100),
    "demo_fashion_mnist.yaml": ("vit_tiny_patch16_224", ["dino", "adclr"], 0, 4, False, False, 32, 2),
    "cpu_smoke.yaml": ("vit_tiny_patch16_224", ["dino"], 2, 0, False, False, 32, 100),  # an overlay, alone
    "zero3.yaml": ("vit_small_patch16_224", ["dino"], 3, 0, False, False, 224, 100),  # an overlay, alone
}


def test_every_shipped_preset_is_listed():
    assert sorted(SHIPPED) == sorted(p.name for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("preset", sorted(SHIPPED))
def test_every_shipped_preset_loads_what_it_says(preset, tmp_path):
    """Each preset's methods, recipe views, model and ZeRO stage (an `extends:` or recipe-name bug shows)."""
    config = load_config(CONFIGS / preset, ["data.path=/nonexistent.beton"])
    arch, methods, zero, queries, swap, nested, global_size, epochs = SHIPPED[preset]
    assert (config.model.arch, config.methods.enabled(), config.deepspeed.zero_stage) == (arch, methods, zero)
    assert (config.recipe.queries.count, config.recipe.swap.enabled, config.recipe.nested) == (queries, swap, nested)
    assert (config.recipe.global_views.size, config.schedule.epochs) == (global_size, epochs)
    assert config.recipe.patch_size == (8 if arch == "vit_tiny_patch16_224" else 16)
    if not preset.startswith(("cpu_smoke", "zero3")):
        assert config.run_dir == f"runs/{preset.removesuffix('.yaml')}"
    assert load_config(save_config(config, tmp_path)) == config  # the saved config reloads to the same run


def test_ibot_and_dinov2_presets_carry_the_released_values():
    """iBOT: shared 8,192-prototype head, learnable weight norm, tau_t 0.07 for both terms, masks with 16-patch
    blocks. DINOv2: SK centring for DINO and iBOT, 0.1 KoLeo, 65,536 prototypes, momentum 0.992, peak lr
    0.004 at a global batch of 1,024, its crops and masks."""
    ibot = load_config(CONFIGS / "ibot_vit_s16.yaml", ["data.path=/x.beton"])
    assert (ibot.methods.head.out_dim, ibot.methods.head.norm_last_layer, ibot.methods.ibot.separate_head) == (8192, False, False)
    assert ibot.methods.dino.teacher_temp == ibot.methods.ibot.teacher_temp == 0.07 and ibot.methods.ibot.weight == 1.0
    assert ibot.recipe.masks.enabled and ibot.recipe.masks.min_block_patches == 16 and ibot.recipe.local_views.count == 10
    dinov2 = load_config(CONFIGS / "dinov2_vit_s16.yaml", ["data.path=/x.beton"])
    methods = dinov2.methods
    assert methods.dino.centering == methods.ibot.centering == "sinkhorn_knopp" and methods.koleo.weight == 0.1
    assert (methods.head.out_dim, methods.head.norm_last_layer, dinov2.schedule.teacher_momentum) == (65536, False, 0.992)
    assert dinov2.optim.lr * 1024 / 256 == pytest.approx(0.004) and dinov2.data.batch_size == 64
    assert dinov2.recipe.global_views.scale == (0.32, 1.0) and dinov2.recipe.local_views.count == 8
    assert dinov2.recipe.masks.enabled and dinov2.recipe.masks.min_block_patches == 4


@pytest.mark.parametrize("overrides, message", [
    (["methods.adclr.enabled=true"], "methods.adclr.enabled: needs query crops: set recipe.queries.count > 0"),
    (["methods.regioncl.enabled=true"], "methods.regioncl.enabled: needs region-swap composites: set recipe.swap.enabled=true"),
    (["methods.dino.enabled=false", "methods.flsl.enabled=true"], "methods.flsl.enabled: needs nested crops: set recipe.nested=true"),
    (["methods.ibot.enabled=true"], "methods.ibot.enabled: needs block masks: set recipe.masks.enabled=true"),
])
def test_methods_need_their_views_at_load_time(tmp_path, capsys, overrides, message):
    """A method whose views the recipe does not make is a config error, not a crash at the first forward."""
    from train.main import main

    path = write_tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run")
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_config(path, overrides)
    assert main(["--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {message}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    fixed = {"methods.adclr.enabled=true": "recipe.queries.count=3", "methods.regioncl.enabled=true": "recipe.swap.enabled=true",
             "methods.flsl.enabled=true": "recipe.nested=true", "methods.ibot.enabled=true": "recipe.masks.enabled=true"}
    load_config(path, [*overrides, fixed[overrides[-1]]])  # with the views made, the same methods load


PLAIN_VIT = "a timm VisionTransformer with one cls token and no registers (e.g. vit_small_patch16_224)"


@pytest.mark.parametrize("arch, message", [
    ("vit_small_patch16_244", f"model.arch: 'vit_small_patch16_244' is not a timm model name; expected {PLAIN_VIT}"),
    ("vit_small_patch14_reg4_dinov2", f"model.arch: 'vit_small_patch14_reg4_dinov2' must be {PLAIN_VIT}"),
], ids=["typo", "registers"])
def test_main_refuses_an_arch_that_is_not_a_plain_vit_before_anything_else(tmp_path, capsys, arch, message):
    """A typo fails at load time (timm's registry), a ViT of another kind in check_model (built on the meta
    device); both before the data files are looked at (x.beton does not exist) and before the run folder."""
    from train.main import main

    path = write_tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run")
    assert main(["--config", str(path), f"model.arch={arch}"]) == 2
    assert capsys.readouterr().err == f"config error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_check_model_builds_the_arch_without_allocating_its_weights(tmp_path, monkeypatch):
    import train.config
    from model.backbone import build_backbone
    from train.config import check_model

    built = []  # what check_model built, through a spy around the real build_backbone
    monkeypatch.setattr(train.config, "build_backbone", lambda cfg: built.append(build_backbone(cfg)) or built[-1])
    config = tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run", ["model.arch=vit_base_patch16_224"])
    check_model(config)
    assert [vit.pos_embed.device.type for vit in built] == ["meta"]
    assert (built[0].embed_dim, len(built[0].blocks)) == (config.model.embed_dim, config.model.depth)  # the config's sizes


@pytest.mark.parametrize("overrides, key", [
    ([], "data.path"),
    (["eval.train_path={beton}", "eval.test_path={missing}"], "eval.test_path"),
    (["eval.train_path={missing}", "eval.test_path={beton}"], "eval.train_path"),
])
def test_main_checks_data_files_exist_before_writing_anything(tmp_path, capsys, overrides, key):
    from train.main import main

    beton, missing = tmp_path / "real.beton", tmp_path / "nope.beton"
    beton.write_bytes(b"")
    data = missing if key == "data.path" else beton
    path = write_tiny_config(tmp_path, data, tmp_path / "run")
    overrides = [o.format(beton=beton, missing=missing) for o in overrides]
    assert main(["--config", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {key}: '{missing}' does not exist") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_fields_over_a_preset_name_keep_the_preset(tmp_path):
    """An overlay (configs/cpu_smoke.yaml) or a dotted override that sets recipe fields on a preset that
    names its recipe (`recipe: adclr`) changes those fields of the ADCLR recipe, not of the defaults."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("recipe:\n  global_views: {size: 32}\n  patch_size: 8\n  queries: {size: 8}\n"
                       "model: {patch_size: 8, img_size: 32}\n")
    config = load_config([Path(__file__).resolve().parents[1] / "configs" / "adclr_vit_s16.yaml", overlay], ["recipe.queries.size=8"])
    assert config.recipe.global_views.size == 32 and config.recipe.queries.size == 8
    assert config.recipe.queries.count == recipe_preset("adclr").queries.count > 0 and config.methods.adclr.enabled
    assert config.recipe.local_views.count == recipe_preset("adclr").local_views.count


def test_overrides_may_come_before_and_after_config_flags():
    from train.main import parse_args

    args = parse_args(["data.path=x.beton", "--config", "a.yaml", "data.batch_size=4", "--config", "b.yaml"])
    assert args.overrides == ["data.path=x.beton", "data.batch_size=4"] and args.config == ["a.yaml", "b.yaml"]


def test_collective_timeout_is_validated(tmp_path):
    path = write_tiny_config(tmp_path, tmp_path / "x.beton", tmp_path / "run")
    assert load_config(path).collective_timeout_s == 600
    assert load_config(path, ["collective_timeout_s=30"]).collective_timeout_s == 30
    with pytest.raises(ConfigError, match=r"^collective_timeout_s: must be >= 1 \(seconds\), got 0$"):
        load_config(path, ["collective_timeout_s=0"])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 24-image labelled .beton, its image folder, an unlabelled folder and a non-dataset file."""
    from test_train_support import make_tiny_beton

    root = tmp_path_factory.mktemp("data")
    beton = make_tiny_beton(root)
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    imagefactory.write_jpeg(unlabelled / "a.jpg", imagefactory.smooth_image(0, 40, 40))
    (root / "notes.txt").write_text("not a dataset\n")
    (root / "broken.beton").write_bytes(b"\0" * 64)
    return {"beton": beton, "folder": root / "images", "unlabelled": unlabelled, "text": root / "notes.txt",
            "broken": root / "broken.beton"}


DATA_MISTAKES = {  # name: (data.path, overrides, the error after "config error: ")
    "batch larger than the data": ("beton", ["data.batch_size=100"],
                                   "data.batch_size: 24 samples in {beton} make no whole global batch of 100 x 1 rank(s); "
                                   "lower data.batch_size or set data.drop_last=false"),
    "ffcv on an image folder": ("folder", ["data.backend=ffcv"], "data.backend: 'ffcv' reads .beton files only and {folder} is an "
                                "image folder: build one with `preprocess build-ffcv`, or use data.backend=dali or reference"),
    "neither .beton nor folder": ("text", [], "data.path: {text} is neither a directory nor a .beton file"),
    "a broken .beton": ("broken", [], "data.path: {broken}: 64 bytes, too short to be a .beton"),
    "unlabelled k-NN memory": ("beton", ["eval.train_path={unlabelled}", "eval.test_path={beton}"],
                               "eval.train_path: {unlabelled} has 1 unlabelled images; the k-NN needs class labels "
                               "(a .beton built from an ImageFolder, or an ImageFolder)"),
    "k-NN queries not a dataset": ("beton", ["eval.train_path={beton}", "eval.test_path={text}"],
                                   "eval.test_path: {text} is neither a directory nor a .beton file"),
    "run folder is a file": ("beton", ["run_dir={text}"], "run_dir: {text} exists and is not a folder"),
}


@pytest.mark.parametrize("mistake", list(DATA_MISTAKES))
def test_data_mistakes_stop_before_anything_is_written(mistake, tiny_data, tmp_path, capsys):
    from train.main import main

    data, overrides, message = DATA_MISTAKES[mistake]
    path = write_tiny_config(tmp_path, tiny_data[data], tmp_path / "run")
    assert main(["--config", str(path), *[o.format(**tiny_data) for o in overrides]]) == 2
    err = capsys.readouterr().err
    assert err == f"config error: {message.format(**tiny_data)}\n"
    assert not (tmp_path / "run").exists()


def test_a_backend_whose_library_is_missing_is_a_config_error(tiny_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    from train.main import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("nvidia") else real_find_spec(name, *a))
    path = write_tiny_config(tmp_path, tiny_data["folder"], tmp_path / "run")
    assert main(["--config", str(path), "data.backend=dali"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: data.backend: 'dali' needs the Python package nvidia.dali, which is not installed "
                          "here: NVIDIA DALI (nvidia.dali) is not installed: install the extra of your CUDA major, "
                          "pip install -e '.[dali-cuda12]'") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_the_same_data_passes_when_the_mistake_is_fixed(tiny_data, tmp_path):
    from train.config import check_data

    config = tiny_config(tmp_path, tiny_data["beton"], tmp_path / "run", ["data.batch_size=100", "data.drop_last=false",
                         f"eval.train_path={tiny_data['folder']}", f"eval.test_path={tiny_data['beton']}"])
    check_data(config, world_size=1)
    check_data(tiny_config(tmp_path, tiny_data["folder"], tmp_path / "run", ["data.backend=dali"]), world_size=1)
    with pytest.raises(ConfigError, match=r"^data\.batch_size: 24 samples in .* of 8 x 4 rank\(s\)"):
        check_data(tiny_config(tmp_path, tiny_data["beton"], tmp_path / "run", ["data.batch_size=8"]), world_size=4)


def test_a_data_mistake_prints_exactly_one_line_from_the_command(tiny_data, tmp_path):
    """Through a real process: nothing else on stderr (no traceback, no library banner)."""
    import subprocess
    import sys

    path = write_tiny_config(tmp_path, tiny_data["beton"], tmp_path / "run")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "train/main.py", "--config", str(path), "data.batch_size=100"],
                            cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [DATA_MISTAKES["batch larger than the data"][2].format(**tiny_data)
                                          .join(["config error: ", ""])]
    assert result.stdout == "" and not (tmp_path / "run").exists()


def test_the_cpu_smoke_overlay_gives_each_preset_its_own_run_dir():
    """Two smoke runs of different presets used to share runs/cpu_smoke (the second resumed, or now would be
    refused by, the first's checkpoint): `{presets}` in run_dir names the folder after the --config files."""
    folders = {preset: load_config([f"configs/{preset}.yaml", "configs/cpu_smoke.yaml"], ["data.path=x.beton"]).run_dir
               for preset in ("adclr_vit_s16", "dino_vit_s16")}
    assert folders == {"adclr_vit_s16": "runs/cpu_smoke/adclr_vit_s16+cpu_smoke",
                       "dino_vit_s16": "runs/cpu_smoke/dino_vit_s16+cpu_smoke"}
    assert load_config(["configs/adclr_vit_s16.yaml", "configs/cpu_smoke.yaml"],
                       ["data.path=x.beton", "run_dir=runs/mine"]).run_dir == "runs/mine"  # an explicit one wins
