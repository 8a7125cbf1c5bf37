"""preprocess CLI and failure handling: interrupted builds leave nothing valid-looking; clear errors."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import imagefactory
import preprocess.build
import preprocess.writer
from preprocess.beton import open_beton
from preprocess.build import BuildError, NothingWrittenError, OutputExistsError, build_ffcv
from preprocess.cli import build_parser, main
from preprocess.sources import SourceError

REPO = Path(__file__).resolve().parents[1]


def fail_on_call(number: int, error: BaseException):
    """A `store_item` that raises `error` on its `number`-th call."""
    original, calls = preprocess.build.store_item, []

    def store_item(item, options):
        calls.append(item)
        if len(calls) == number:
            raise error
        return original(item, options)
    return store_item


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_build_leaves_no_output(tmp_path, monkeypatch, error):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=4)
    monkeypatch.setattr(preprocess.build, "store_item", fail_on_call(5, error))
    with pytest.raises(type(error)):
        build_ffcv(tmp_path / "src", tmp_path / "out" / "set.beton")
    assert list((tmp_path / "out").iterdir()) == []  # no .beton, no manifest, no partial files


def test_interrupted_overwrite_keeps_the_old_dataset(tmp_path, monkeypatch):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=4)
    build_ffcv(tmp_path / "src", tmp_path / "set.beton")
    before = (tmp_path / "set.beton").read_bytes()
    monkeypatch.setattr(preprocess.build, "store_item", fail_on_call(3, RuntimeError("stop")))
    with pytest.raises(RuntimeError):
        build_ffcv(tmp_path / "src", tmp_path / "set.beton", overwrite=True, max_resolution=20)
    assert (tmp_path / "set.beton").read_bytes() == before and len(open_beton(tmp_path / "set.beton")) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.beton", "set.manifest.json", "set.skipped.tsv", "src"]


@pytest.mark.parametrize("workers, signal_number", [(1, signal.SIGTERM), (2, signal.SIGTERM), (2, signal.SIGINT)])
def test_signal_during_build_removes_partial_files(tmp_path, workers, signal_number):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=20)
    script = textwrap.dedent(f"""
        import time, preprocess.build, preprocess.cli
        original = preprocess.build.store_item
        def slow(item, options):
            time.sleep(0.05)
            return original(item, options)
        preprocess.build.store_item = slow
        arguments = ["build-ffcv", "{tmp_path / 'src'}", "{tmp_path / 'out' / 'x.beton'}", "--workers", "{workers}"]
        raise SystemExit(preprocess.cli.main(arguments))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 20
    while not list((tmp_path / "out").glob("x.beton.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, "the build finished before it could be interrupted"
    child.send_signal(signal_number)
    assert child.wait(timeout=60) == 128 + signal_number  # generous: a loaded 2-core box is slow to reap a pool
    assert list((tmp_path / "out").iterdir()) == []


def test_errors_name_the_problem(tmp_path):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=1, per_class=2)
    with pytest.raises(SourceError, match="does not exist"):
        build_ffcv(tmp_path / "nowhere", tmp_path / "a.beton")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        build_ffcv(tmp_path / "empty", tmp_path / "a.beton")
    (tmp_path / "not_images" / "c").mkdir(parents=True)
    (tmp_path / "not_images" / "c" / "a.txt").write_text("x")
    with pytest.raises(SourceError, match="no images found.*1 files rejected"):
        build_ffcv(tmp_path / "not_images", tmp_path / "a.beton")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(BuildError, match="cannot create its folder"):
        build_ffcv(tmp_path / "src", tmp_path / "a_file" / "a.beton")
    with pytest.raises(BuildError, match="must end in .beton"):
        build_ffcv(tmp_path / "src", tmp_path / "a.ffcv")
    with pytest.raises(ValueError, match="jpeg_quality"):
        build_ffcv(tmp_path / "src", tmp_path / "a.beton", jpeg_quality=0)
    build_ffcv(tmp_path / "src", tmp_path / "a.beton")
    with pytest.raises(OutputExistsError, match="already exists; pass overwrite=True to replace it"):
        build_ffcv(tmp_path / "src", tmp_path / "a.beton")
    assert build_ffcv(tmp_path / "src", tmp_path / "a.beton", overwrite=True).num_written == 2


def test_nothing_written_is_an_error_with_a_report(tmp_path):
    (tmp_path / "src" / "c").mkdir(parents=True)
    (tmp_path / "src" / "c" / "a.jpg").write_bytes(b"")
    (tmp_path / "src" / "c" / "b.png").write_bytes(b"garbage")
    with pytest.raises(NothingWrittenError, match="all 2 inputs were skipped"):
        build_ffcv(tmp_path / "src", tmp_path / "x.beton")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "x.skipped.tsv"]
    assert len((tmp_path / "x.skipped.tsv").read_text().splitlines()) == 3


def test_cli_build_summary_and_exit_codes(tmp_path, capsys):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=2)
    (tmp_path / "src" / "class_0" / "zero.jpg").write_bytes(b"")
    out = str(tmp_path / "set.beton")
    assert main(["build-ffcv", str(tmp_path / "src"), out, "--workers", "2", "--max-resolution", "32",
                 "--jpeg-quality", "85", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "written 4, skipped 1" in printed and "images/s" in printed and "zero.jpg: empty file" in printed
    assert open_beton(out).manifest["options"]["jpeg_quality"] == 85
    assert main(["build-ffcv", str(tmp_path / "src"), out]) == 2
    error = capsys.readouterr().err
    assert f"{out}: already exists; pass --overwrite to replace it" in error and "overwrite=True" not in error
    assert main(["build-ffcv", str(tmp_path / "missing"), str(tmp_path / "b.beton")]) == 2
    assert main(["verify", str(tmp_path / "missing.beton")]) == 2
    (tmp_path / "bad" / "c").mkdir(parents=True)
    (tmp_path / "bad" / "c" / "a.jpg").write_bytes(b"x")
    assert main(["build-ffcv", str(tmp_path / "bad"), str(tmp_path / "c.beton")]) == 1
    result = subprocess.run([sys.executable, "-m", "preprocess", "inspect", out], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0 and "4 images" in result.stdout


def test_cli_os_error_names_the_output(tmp_path, monkeypatch, capsys):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=1, per_class=2)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name
    monkeypatch.setattr(preprocess.writer.BetonWriter, "append", disk_full)
    out = tmp_path / "set.beton"
    assert main(["build-ffcv", str(tmp_path / "src"), str(out), "--no-progress"]) == 1
    assert f"preprocess: error: {out}: [Errno 28] No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]


def test_cli_closed_stdout_ends_quietly(tmp_path):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=1, per_class=2)
    build_ffcv(tmp_path / "src", tmp_path / "set.beton")
    child = subprocess.Popen([sys.executable, "-m", "preprocess", "inspect", "--json", str(tmp_path / "set.beton")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # like `| head` that has already exited: every write is a broken pipe
    error = child.stderr.read()
    assert child.wait(timeout=60) == 1 and error == ""


def test_cli_help_explains_the_arguments():
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("inspect", "verify"):
        beton = next(action for action in commands[name]._actions if action.dest == "beton")
        assert ".beton file" in beton.help
    assert "CRC32" in commands["verify"].format_help()


def watch_renames(monkeypatch, out_folder: Path, fail_at: int = 0) -> list:
    """Wrap os.replace: record (target name, folder listing before the call) for each rename into `out_folder`,
    raise an injected OSError on the `fail_at`-th one, and after each rename check that a `.beton` in the folder
    opens with its manifest (never a `.beton` without a matching manifest, at any moment)."""
    original, seen = os.replace, []

    def replace(source, target):
        if Path(target).parent != out_folder:
            return original(source, target)
        seen.append((Path(target).name, sorted(p.name for p in out_folder.iterdir())))
        if len(seen) == fail_at:
            raise OSError(errno.EIO, "Input/output error (injected)")
        original(source, target)
        for beton in out_folder.glob("*.beton"):
            open_beton(beton)  # raises BetonError without its manifest, or with another build's
    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_renames_put_the_beton_last(tmp_path, monkeypatch):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=2)
    (tmp_path / "out").mkdir()
    seen = watch_renames(monkeypatch, tmp_path / "out")
    build_ffcv(tmp_path / "src", tmp_path / "out" / "set.beton")
    assert [target for target, _ in seen] == ["set.skipped.tsv", "set.manifest.json", "set.beton"]
    seen.clear()
    build_ffcv(tmp_path / "src", tmp_path / "out" / "set.beton", overwrite=True, max_resolution=20)
    assert [target for target, _ in seen] == ["set.skipped.tsv", "set.manifest.json", "set.beton"]
    assert "set.beton" not in seen[0][1]  # the old .beton went before any new file took a final name
    assert open_beton(tmp_path / "out" / "set.beton").manifest["options"]["max_resolution"] == 20


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_build_failing_at_its_renames_leaves_no_file_of_any_kind(tmp_path, monkeypatch, fail_at, overwrite):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=2)
    (tmp_path / "src" / "class_0" / "broken.jpg").write_bytes(b"")  # a non-empty skipped list
    out = tmp_path / "out"
    out.mkdir()
    if overwrite:
        build_ffcv(tmp_path / "src", out / "set.beton")
    seen = watch_renames(monkeypatch, out, fail_at=fail_at)
    with pytest.raises(OSError, match="injected"):
        build_ffcv(tmp_path / "src", out / "set.beton", overwrite=overwrite)
    first_target, before = seen[0]
    assert first_target == "set.skipped.tsv" and all(  # it failed late: every partial had been written
        any(name.startswith(f"set.{kind}.partial-") for name in before) for kind in ("beton", "manifest.json", "skipped.tsv"))
    assert list(out.iterdir()) == []  # no partial, no manifest or skipped list without its .beton, no old half


def test_a_build_failing_while_writing_its_manifest_leaves_no_partial(tmp_path, monkeypatch):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=2)
    build_ffcv(tmp_path / "src", tmp_path / "set.beton")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    original = Path.write_text

    def write_text(path, text, *args, **kwargs):
        if ".manifest.json.partial-" in path.name:
            assert any(p.name.startswith("set.beton.partial-") for p in tmp_path.iterdir())
            assert any(p.name.startswith("set.skipped.tsv.partial-") for p in tmp_path.iterdir())
            original(path, text[: len(text) // 2], *args, **kwargs)  # half written, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, text, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError, match="No space left"):
        build_ffcv(tmp_path / "src", tmp_path / "set.beton", overwrite=True, max_resolution=20)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # the old dataset whole, nothing partial beside it


def test_an_interrupt_right_after_the_last_rename_keeps_the_complete_dataset(tmp_path, monkeypatch):
    imagefactory.make_image_folder(tmp_path / "src", num_classes=2, per_class=2)
    original = os.replace

    def replace(source, target):
        original(source, target)
        if Path(target).suffix == ".beton":
            raise KeyboardInterrupt  # Ctrl-C as the last rename returns
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        build_ffcv(tmp_path / "src", tmp_path / "set.beton")
    assert len(open_beton(tmp_path / "set.beton")) == 4  # the finished dataset stays, with its manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.beton", "set.manifest.json", "set.skipped.tsv", "src"]
