"""Suite-wide test settings: GPU-marked tests skip cleanly without CUDA; the tests' own helpers import;
the tiny image folder and .beton that the pipeline tests share."""
import sys
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import pytest
import torch

# Import hypothesis now, not at the end of the session: its pytest plugin imports it lazily in
# `pytest_terminal_summary` when no test module did, and pytest's assertion rewriter then runs `ast.parse`
# on it while garbage collection may run numba's dispatcher finalizers (ffcv compiles its pipelines with
# numba). Such a finalizer raising inside `ast.parse` corrupts CPython 3.11's AST recursion counter:
# "SystemError: AST constructor recursion depth mismatch" and exit status 1 after a green run
# (`pytest tests/test_backends.py tests/test_loader.py`). Imported here, nothing is parsed at summary time.

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import imagefactory` from any test module

import imagefactory  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_pytest(tmp_path_factory):
    """Temporary files of the code under test (e.g. `--benchmark`'s run folder, `tempfile.mkdtemp`) and of
    the processes it starts go under pytest's own temporary tree, which pytest prunes, not into /tmp."""
    import os
    import tempfile

    folder = str(tmp_path_factory.mktemp("tmp"))
    previous = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    if previous[0] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous[0]
    tempfile.tempdir = previous[1]


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests skip without CUDA; DALI-marked ones without nvidia.dali (a GPU machine before DALI is
    installed: benchmarks/gpu/run.sh's first call)."""
    import importlib.util

    skips = []
    if not torch.cuda.is_available():
        skips.append(("gpu", pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")))
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        skips.append(("dali", pytest.mark.skip(reason="needs nvidia.dali (not installed)")))
    for item in items:
        for keyword, skip in skips:
            if keyword in item.keywords:
                item.add_marker(skip)


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
