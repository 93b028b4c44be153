"""Every example in every command's --help runs as written.

The examples name the paths a user has after the README's set-up: `configs/`, `models/smollm2-135m`
(here the tiny test model stands behind that path, so the examples run in seconds) and the HH-RLHF
data in `../shared`. They run in that order in one workspace, as a user would run them (eval and
explain read the runs that the train examples wrote); convert-gguf writes into a workspace of its own.
"""

import shlex
from pathlib import Path

import pytest

from tokenratio.cli import COMMANDS, build_parser, main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [(c.__name__.rsplit(".", 1)[1], line) for c in COMMANDS for line in c.EXAMPLES]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tiny import make_tiny_model

    # 4 layers: the shipped CPU configs put LoRA on the last 4 (model.lora_last_layers)
    tiny_model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny-4-layers"), layers=4)
    root = tmp_path_factory.mktemp("user")
    (root / "shared").symlink_to(REPO.parent / "shared")
    work = root / "work"
    (work / "models").mkdir(parents=True)
    (work / "configs").symlink_to(REPO / "configs")
    (work / "models" / "smollm2-135m").symlink_to(tiny_model_dir)
    return work


def test_every_command_shows_its_examples_in_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command, line in EXAMPLES:
        name = "convert-gguf" if command == "convert" else command
        assert line in sub.choices[name].format_help().replace("\n  ", " ").replace("  ", " ") or (
            line in sub.choices[name].description
        ), (command, line)


@pytest.mark.parametrize(("command", "line"), EXAMPLES, ids=[line for _, line in EXAMPLES])
def test_example_runs_as_written(command, line, workspace, tmp_path, monkeypatch):
    assert line.startswith("tokenratio ")
    monkeypatch.chdir(tmp_path if command == "convert" else workspace)
    assert main(shlex.split(line)[1:]) == 0, line
