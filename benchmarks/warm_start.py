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
import preprocess  # noqa: E402
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
    samples = random.Random(0).sample(preprocess.load_samples(ROOT / cfg["data"]["train_file"]), 8)
    prompts = [tokenizer.apply_chat_template(preprocess.policy_messages(s), add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for s in samples]
    answers = [tokenizer(s["expert_turn"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for s in samples]
    prompt, prompt_mask = grpo.left_pad(prompts, tokenizer.pad_token_id)
    width = max(map(len, answers))
    answer = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers])
    answer_mask = (torch.arange(width) < torch.tensor(list(map(len, answers)))[:, None]).long()

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
