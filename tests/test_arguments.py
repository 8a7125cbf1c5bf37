"""Command-line numbers are checked where they are parsed (pipeline/arguments.py): one line naming the flag,
exit code 2, before a model is loaded or a dataset opened."""
from __future__ import annotations

import importlib

import pytest

from pipeline.arguments import integer, number


@pytest.mark.parametrize("program, flag, value, rule", [
    ("train.eval_knn", "--k", "0", "an integer >= 1"),
    ("train.eval_knn", "--k", "-3", "an integer >= 1"),
    ("train.eval_knn", "--temperature", "0", "a finite number > 0"),
    ("train.eval_knn", "--image-size", "0", "an integer >= 1"),
    ("train.eval_knn", "--batch-size", "0", "an integer >= 1"),
    ("train.eval_knn", "--workers", "-1", "an integer >= 0"),
    ("train.eval_knn", "--max-test-samples", "-5", "an integer >= 0"),
    ("train.eval_linear", "--epochs", "0", "an integer >= 1"),
    ("train.eval_linear", "--lr", "nan", "a finite number > 0"),
    ("train.eval_linear", "--lr", "inf", "a finite number > 0"),
    ("train.eval_linear", "--batch-size", "0", "an integer >= 1"),
    ("train.main", "--benchmark", "-5", "an integer >= 0"),
    ("train.main", "--warmup-steps", "x", "an integer >= 0"),
])
def test_a_bad_number_on_the_command_line_is_one_line(program, flag, value, rule, capsys):
    module = importlib.import_module(program)
    with pytest.raises(SystemExit) as stop:
        module.main(["run_dir_that_is_never_opened", f"{flag}={value}"] if program != "train.main" else [f"{flag}={value}"])
    assert stop.value.code == 2
    prog = {"train.eval_knn": "eval_knn", "train.eval_linear": "eval_linear", "train.main": "train/main.py"}[program]
    assert capsys.readouterr().err == f"{prog}: error: argument {flag}: must be {rule}, got {value!r}\n"


def test_the_converters_take_their_boundaries():
    assert integer(0)("0") == 0 and integer(1)("1") == 1 and integer(1)("12") == 12
    assert number(0)("1e-9") == 1e-9 and number(0, inclusive=True)("0") == 0.0
    for converter, text in ((integer(1), "0"), (integer(0), "1.5"), (number(0), "0"), (number(0), "-inf"),
                            (number(0, inclusive=True), "-1e-9"), (number(0), "abc")):
        with pytest.raises(Exception, match="must be"):
            converter(text)
