"""`tokenratio explain` end to end: the page renders in headless Chromium, the PNG is written."""

import json
import subprocess

import pytest

from tokenratio.cli import main


@pytest.mark.slow
def test_explain_renders_a_page_chromium_can_show(tiny_model_dir, hh_jsonl, tmp_path):
    import matplotlib.image

    from tiny import make_tiny_model

    # A policy that differs from the reference (other random init) so credits are non-zero.
    policy = make_tiny_model(tmp_path / "policy", hidden=32)
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(policy)
    out = tmp_path / "explain"
    assert (
        main(
            [
                "explain",
                "--model",
                str(policy),
                "--reference",
                str(tiny_model_dir),
                "--data",
                str(hh_jsonl),
                "--index",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    page = (out / "explain.html").read_text()
    assert page.count('class="tok"') > 10 and "beta*r_t" in page and "<script" not in page
    assert (out / "explain.png").read_bytes()[:4] == b"\x89PNG"
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            (out / "explain.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]
    red = ((pixels[..., 0] > pixels[..., 1] + 0.1) & (pixels[..., 0] > pixels[..., 2] + 0.1)).sum()
    green = (
        (pixels[..., 1] > pixels[..., 0] + 0.1) & (pixels[..., 1] > pixels[..., 2] + 0.1)
    ).sum()
    assert red > 200 and green > 200, (red, green)  # both colours of credit are on screen


def test_explain_reads_the_record_it_needs_and_warns_about_training_pairs(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    from tokenratio.eval.explain import read_record

    lines = hh_jsonl.read_text().splitlines()
    data = tmp_path / "one-bad.jsonl"
    data.write_text("\n".join([lines[0], '{"chosen": 1', *lines[1:6]]) + "\n")
    assert read_record(str(data), 0).dataset[0]["chosen"]  # line 2 is never read
    assert main(["explain", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir),
                 "--data", str(data), "--index", "3", "--out", str(tmp_path / "ex")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "line 2" in err and "--on-invalid skip" in err and "data.on_invalid" not in err
    record = read_record(str(data), 3, "skip")
    assert record.dataset[0]["chosen"] == json.loads(lines[3])["chosen"]
