"""`tokenratio` end to end through `main(argv)`."""

import json

import pytest

from tokenratio.cli import main


@pytest.mark.slow
def test_bench_quick_writes_table_json_and_plots(tmp_path, capsys):
    assert main(["bench", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for method in ("dpo", "tbpo-q", "tbpo-a", "tisdpo", "opt-seq", "opt-tok"):
        assert method in table
    assert (tmp_path / "finite.txt").read_text() in table
    results = json.loads((tmp_path / "finite.json").read_text())
    methods = {row["method"] for row in results["summary"]}
    assert {"dpo", "ipo", "bpo", "tdpo1", "tdpo2", "tisdpo", "tbpo-q", "tbpo-a"} <= methods
    for run in results["runs"]:  # every method learns something from pi_ref
        assert run["final"]["kl_ref"] > 0.01
        assert run["final"]["heldout_acc"] > 0.6
    for name in ("frontier.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_bench_rejects_unknown_loss(capsys):
    assert main(["bench", "--losses", "dpo", "nope", "--no-progress"]) == 2
    assert "valid losses" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "bench" in capsys.readouterr().out
