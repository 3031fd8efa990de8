import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Real RealMedConv records live beside the checkout, not in it (their licence is not ours).
FIXTURES = Path(os.environ.get("L2A_FIXTURES", ROOT.parent / "shared" / "fixtures"))
assert FIXTURES.is_dir(), f"real records not found at {FIXTURES}: set L2A_FIXTURES"


def tiny_llama(seed=0, vocab_size=96, tie=True):
    """A random-init Llama small enough for CPU tests, with the tied embeddings of SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model():
    return tiny_llama()
