"""The default's two per-step costs outside GRPO, each against the way it was done before, on the bundled
SmolLM2-135M in bfloat16 (run alone):

- a warm-start batch of 8 demo samples, forward and backward: padded rows against packed ones
  (grpo.packed_prompt_logprobs, which l2a.warm_start_step uses);
- an AdamW step over the FSDP2-sharded model on one rank: the default implementation (foreach) against
  fused (which l2a.start uses).

    python benchmarks/warm_start.py
"""
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fsdp  # noqa: E402
import grpo  # noqa: E402
import l2a  # noqa: E402
import learn_to_ask  # noqa: E402
from config import load_config  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def timed(fn, reps=3):
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main():
    fsdp.setup_distributed()
    cfg = load_config(ROOT / "config.toml")
    path = fsdp.resolve_model_path(cfg["model"]["path"])
    tokenizer, model = AutoTokenizer.from_pretrained(path), fsdp.load_model(path, cfg, torch.device("cpu"))
    samples = random.Random(0).sample(learn_to_ask.load_samples(ROOT / cfg["data"]["train_file"]), 8)
    _, prompts, _ = l2a.encode_prompts(samples, learn_to_ask.messages, tokenizer, cfg["data"]["max_prompt_tokens"])
    prompt, prompt_mask, answer, answer_mask = l2a.demonstration_batch(
        tokenizer, prompts, [learn_to_ask.demonstration(s) for s in samples], cfg["grpo"]["max_new_tokens"])
    width = answer.size(1)

    def padded():
        logprobs, _ = grpo.token_logprobs(model, torch.cat([prompt, answer], 1), torch.cat([prompt_mask, answer_mask], 1),
                                          width)
        (-(logprobs * answer_mask).sum()).backward()

    def packed():
        logprobs, _ = grpo.packed_prompt_logprobs(model, prompt, prompt_mask, torch.arange(8), answer, answer_mask)
        (-(logprobs * answer_mask).sum()).backward()

    print(f"warm-start batch of 8 ({prompt_mask.sum()} prompt tokens, {prompt_mask.numel()} padded), forward and "
          f"backward: padded {timed(padded):.2f} s, packed {timed(packed):.2f} s")
    for fused in (False, True):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
        print(f"AdamW step, {'fused' if fused else 'foreach'}: {timed(optimizer.step):.2f} s")


if __name__ == "__main__":
    main()
