"""Suite-wide test settings: GPU-marked tests skip cleanly without CUDA; the tests' own helpers import;
the tiny image folder and .beton that the pipeline tests share."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import imagefactory` from any test module

import imagefactory  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder of 12 tiny JPEGs (3 classes x 4; sizes cycle 48x64, 64x48, 56x56; colour = index)."""
    root = tmp_path_factory.mktemp("folder")
    imagefactory.make_image_folder(root, num_classes=3, per_class=4)
    return root


@pytest.fixture(scope="module")
def beton(folder, tmp_path_factory):
    """`folder` as a .beton (with its manifest), built by preprocess.build.build_ffcv."""
    from preprocess.build import build_ffcv

    path = tmp_path_factory.mktemp("beton") / "tiny.beton"
    build_ffcv(folder, path)
    return path
