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
