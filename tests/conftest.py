"""Shared fixtures: paths to the shared tiny models, tiny random HF checkpoints, engine processes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from microserve.launch import EngineSpec, LocalEngine, LocalLauncher

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = str(SHARED / "models" / "stories260K")
STORIES_HD32 = str(SHARED / "models" / "stories260K-hd32")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every engine and router the tests start holds this cluster token (they inherit the environment),
# as under `microserve up`; tests send it with AUTH on the microserving and debug calls.
CLUSTER_TOKEN = os.environ.setdefault("MICROSERVE_CLUSTER_TOKEN", "test-cluster-token")
AUTH = {"Authorization": f"Bearer {CLUSTER_TOKEN}"}


def pytest_configure(config):
    """Build (or load) the CPU kernels once, here, with the build's progress on the terminal, before
    tests start engine processes side by side. With MICROSERVE_REQUIRE_KERNELS=1 (CI) a failed build
    stops the run here."""
    import logging
    import sys

    from microserve.kernels.build import KernelBuildError, kernel_error
    logger = logging.getLogger("microserve.kernels")
    handler = logging.StreamHandler(sys.__stderr__)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        kernel_error()
    except KernelBuildError as e:
        pytest.exit(str(e), returncode=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)

# Most of the story stories260K tells greedily after "The sun was": it ends it (with token 1)
# within ~20 more tokens, so a request on it finishes with finish_reason "stop".
STORY_END = ("The sun was shining and the sky was very shiny. It was a big, shiny ball. The sky was very shiny and "
             "shiny. It was a big, shiny ball. The sky was very shiny and shiny.\nOne day, a little boy named Tim "
             "came to the sky. He saw the ball and wanted to play with it. He wanted to play with the ball. He "
             "picked up the ball and put it in the ball. Tim was very happy. He went to the ball and said, \"Thank "
             "you, Tim!\"\nTim and the ball played with the ball. They played together all day. They had a lot of "
             "fun. Tim and t")


def make_hf_model(path: Path, arch: str = "llama", **overrides) -> str:
    """Save a tiny random transformers model (the correctness oracle) with a tokenizer copied from
    stories260K, so the engine and transformers load the very same weights."""
    import torch
    import transformers

    base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2)
    base.update(overrides)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls[1](cls[0](**base)).eval()
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / f).write_text((Path(STORIES) / f).read_text())
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


class EngineProcs:
    """Start engine server processes through the launcher; all are stopped at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.launcher = LocalLauncher(str(tmp), startup_timeout_s=90)

    def start(self, *args: str, model: str = STORIES, name: str = "engine") -> LocalEngine:
        # a StartupError carries the log's last lines
        return self.launcher.start([EngineSpec(model, args=["--debug-api", *args], name=name)])[0]

    def stop_all(self) -> None:
        self.launcher.stop()


@pytest.fixture
def engines(tmp_path):
    e = EngineProcs(tmp_path)
    yield e
    e.stop_all()


@pytest.fixture(scope="module")
def module_engines(tmp_path_factory):
    e = EngineProcs(tmp_path_factory.mktemp("engines"))
    yield e
    e.stop_all()


def kv_accounting(url: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(urllib.request.Request(url + "/debug/kv", headers=AUTH)) as r:
        return json.loads(r.read())
