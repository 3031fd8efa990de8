import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads it once

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fsdp  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"  # two real RealMedConv records, under their own licence (see its README)


def metric_lines(out_dir):
    """Every line of a run's metrics.jsonl, in order ([] before the run wrote one)."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tiny_llama(seed=0, vocab_size=96, tie=True):
    """A random-init Llama small enough for CPU tests, with the tied embeddings of SmolLM2."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init Llama with SmolLM2's tokenizer and chat template (read from the bundled GGUF)."""
    folder = tmp_path_factory.mktemp("tiny")
    gguf = fsdp.bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)  # SmolLM2's ids: bos 1, eos = pad = 2
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def model():
    return tiny_llama()
