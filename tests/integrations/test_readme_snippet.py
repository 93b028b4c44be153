"""The README's TRL snippet runs as written, offline on a CPU: `models/smollm2-135m` is the tiny
test model here and `../shared` the real HH data, as after the README's set-up."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
REPO = Path(__file__).resolve().parents[2]


def readme_trl_snippet() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Train with TRL") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_trl_snippet_runs_as_written(tiny_model_dir, tmp_path):
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "smollm2-135m").symlink_to(tiny_model_dir)
    snippet = readme_trl_snippet()
    assert "TBPOTrainer" in snippet and "trainer.train()" in snippet
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
             "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin",
             "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "is not a prefix" not in result.stderr + result.stdout
    )  # the prompt is cut where HH's ends
    checkpoints = list((work / "runs" / "trl-tbpo-q").glob("checkpoint-4"))
    assert checkpoints, sorted(p.name for p in (work / "runs" / "trl-tbpo-q").iterdir())
