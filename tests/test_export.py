"""Export: the teacher backbone as safetensors that timm loads (pretrained_cfg_overlay and load_state_dict),
with the teacher's exact features at the training size and at another input size."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_train_support import make_tiny_beton, tiny_config


@pytest.mark.slow
def test_exported_teacher_loads_in_timm_with_identical_features(tmp_path, capsys):
    from train.export import main
    from train.main import train
    from train.restore import load_teacher

    beton = make_tiny_beton(tmp_path / "data")
    config = tiny_config(tmp_path, beton, tmp_path / "run", ["schedule.max_steps=2", "deepspeed.zero_stage=3"])
    assert train(config) == "done"
    (tmp_path / "a_file").write_text("x")
    assert main([str(tmp_path / "run"), str(tmp_path / "a_file" / "teacher.safetensors")]) == 2  # checked before loading
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export:")]
    assert errors == [f"export: cannot write {tmp_path / 'a_file' / 'teacher.safetensors'}: {tmp_path / 'a_file'} is a file, not a folder"]
    out = tmp_path / "teacher.safetensors"
    assert main([str(tmp_path / "run"), str(out)]) == 0
    assert "pretrained_cfg_overlay" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("*teacher.safetensors*")) == ["teacher.safetensors"]  # no .partial left

    metadata = safe_open(str(out), "pt").metadata()
    kwargs = json.loads(metadata["timm_kwargs"])
    assert metadata["arch"] == "vit_tiny_patch16_224" and kwargs["embed_dim"] == 64 and kwargs["patch_size"] == 8
    via_overlay = timm.create_model(metadata["arch"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), **kwargs).eval()
    via_state_dict = timm.create_model(metadata["arch"], **kwargs).eval()
    via_state_dict.load_state_dict(load_file(str(out)))  # strict: exactly the backbone's keys

    _, teacher, _ = load_teacher(tmp_path / "run")
    images = torch.randn(3, 3, 32, 32)
    expected = teacher.features(images)
    assert torch.equal(via_overlay(images), expected)
    assert torch.equal(via_state_dict(images), expected)
    random_init = timm.create_model(metadata["arch"], **kwargs).eval()
    assert not torch.allclose(random_init(images), expected)  # the weights really came from the file
    other_size = torch.randn(2, 3, 48, 40)  # 6 x 5 patches, not the 4 x 4 of training: position embeddings resampled
    assert via_overlay(other_size).shape == (2, 64)
    assert torch.equal(via_overlay(other_size), teacher.features(other_size))


def test_export_refuses_a_non_safetensors_name(tmp_path, capsys):
    from train.export import main

    assert main([str(tmp_path), str(tmp_path / "teacher.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_export_of_a_missing_or_empty_run_is_a_one_line_error(tmp_path, capsys):
    from train.export import main

    assert main([str(tmp_path / "nope"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == (f"export: {tmp_path / 'nope'} does not exist; pass a run folder (with config.yaml and checkpoints/) "
                   f"or a checkpoint folder (with trainer.pt)\n")
    assert main([str(tmp_path), str(tmp_path / "out.safetensors")]) == 2  # exists, but is neither
    assert capsys.readouterr().err == f"export: {tmp_path} is neither a run folder (with config.yaml) nor a checkpoint (with trainer.pt)\n"
    assert not (tmp_path / "out.safetensors").exists()
