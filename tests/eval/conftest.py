"""Fixtures of the evaluation tests: a local judge server and a reward model (SmolLM2: the
session's `smollm2_dir`, tests/conftest.py)."""

import threading
from http.server import ThreadingHTTPServer

import pytest

from judge_stub import StubJudge


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
