"""metrics.jsonl, read and trimmed in one place: a damaged line is one error naming the file and
the line, wherever the log is read (the trainer's summary, the curves, the study, perf)."""

import json

import pytest

from tokenratio import runlog


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_append_read_last_evaluation_and_trim(tmp_path):
    path = tmp_path / runlog.NAME
    assert runlog.read(path) == [] and runlog.last_evaluation(path) == {}
    for record in [
        {"step": 1, "loss": 0.7},
        {"step": 2, "eval_loss": 0.6},
        {"step": 3, "loss": 0.5},
    ]:
        runlog.append(path, record)
    assert [r["step"] for r in runlog.read(path)] == [1, 2, 3]
    assert runlog.last_evaluation(path) == {"step": 2, "eval_loss": 0.6}
    runlog.trim(path, 2)
    assert [r["step"] for r in runlog.read(path)] == [1, 2]
    runlog.trim(path, 0)
    assert not path.exists()


@pytest.mark.parametrize(
    "damage, where",
    [
        (lambda text: text[: len(text) // 2 + 3], "line 2: not a JSON record"),  # cut short
        (lambda text: text.replace('"loss"', '"loss', 1), "line 1: not a JSON record"),
        (lambda text: text + "[1, 2]\n", "line 4: not a JSON object"),
        (lambda text: text + "\x00\x01 garbage\n", "line 4: not a JSON record"),
    ],
    ids=["truncated", "broken line", "a list", "garbage"],
)
def test_a_damaged_line_is_named_by_file_and_line(tmp_path, damage, where):
    path = write(tmp_path / runlog.NAME, [{"step": 1, "loss": 0.7}, {"step": 2}, {"step": 3}])
    path.write_text(damage(path.read_text()))
    with pytest.raises(runlog.RunLogError) as err:
        runlog.read(path)
    assert str(err.value).startswith(f"{path}, {where}") and "\n" not in str(err.value)


def test_bytes_that_are_not_text_and_an_empty_log(tmp_path):
    path = tmp_path / runlog.NAME
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(runlog.RunLogError, match="not UTF-8"):
        runlog.read(path)
    path.write_text("")
    assert runlog.read(path) == []


def test_the_curves_and_the_study_read_through_it(tmp_path):
    from tokenratio.curves import plot_run
    from tokenratio.study.runner import final_heldout_accuracy

    path = write(tmp_path / runlog.NAME, [{"step": 1, "loss": 0.7}])
    path.write_text(path.read_text() + '{"step": 2, "eval_rew\n')
    with pytest.raises(runlog.RunLogError, match="line 2"):
        plot_run(path, tmp_path / "curves.png")
    with pytest.raises(runlog.RunLogError, match="line 2"):
        final_heldout_accuracy(tmp_path)
