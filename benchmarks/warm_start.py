"""The default's two per-step costs outside GRPO, each against the way it was done before, on the bundled
SmolLM2-135M in bfloat16 (run alone):

- the warm start's first batch of 8 demo samples, forward and backward: padded rows, packed ones
  (grpo.packed_prompt_logprobs), and chained ones, where a consultation's turns share one row
  (grpo.packed_row_logprobs over l2a.chained_rows, which l2a.warm_start_step uses);
- an AdamW step over the FSDP2-sharded model on one rank: the default implementation (foreach) against
  fused (which l2a.start uses).

    python benchmarks/warm_start.py
"""
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

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
    samples, prompts = l2a.load_split(cfg, learn_to_ask, "train_file", l2a.read_split(learn_to_ask, cfg, "train_file"),
                                      tokenizer)
    answers = [l2a.answer_ids(tokenizer, learn_to_ask.demonstration(s), cfg["grpo"]["max_new_tokens"]) for s in samples]
    chains = l2a.demonstration_chains(prompts, answers)
    batch = l2a.warm_start_indices(chains, 0, cfg["sft"]["prompts_per_step"], cfg["train"]["seed"])
    prompt, prompt_mask = grpo.left_pad([prompts[i] for i in batch], tokenizer.pad_token_id)
    answer = pad_sequence([torch.tensor(answers[i]) for i in batch], batch_first=True,
                          padding_value=tokenizer.pad_token_id)
    answer_mask = pad_sequence([torch.ones(len(answers[i]), dtype=torch.long) for i in batch], batch_first=True)
    rows, scored = l2a.chained_rows(batch, prompts, answers)
    width = answer.size(1)

    def padded():
        logprobs, _ = grpo.token_logprobs(model, torch.cat([prompt, answer], 1), torch.cat([prompt_mask, answer_mask], 1),
                                          width)
        (-(logprobs * answer_mask).sum()).backward()

    def packed():
        logprobs, _ = grpo.packed_prompt_logprobs(model, prompt, prompt_mask, torch.arange(len(batch)), answer,
                                                  answer_mask)
        (-(logprobs * answer_mask).sum()).backward()

    def chained():
        (-grpo.packed_row_logprobs(model, rows, scored).sum()).backward()

    print(f"warm-start batch of {len(batch)} ({prompt_mask.sum()} prompt tokens, {prompt_mask.numel()} padded; "
          f"{len(rows)} chained rows of {sum(map(len, rows))} tokens), forward and backward: padded "
          f"{timed(padded):.2f} s, packed {timed(packed):.2f} s, chained {timed(chained):.2f} s")
    row_by_row = sum(len(p) + len(a) for p, a in zip(prompts, answers))
    chained_pass = sum(len(prompts[c[-1]]) + len(answers[c[-1]]) for c in chains)
    print(f"a pass over the training split: {row_by_row} tokens row by row, {chained_pass} chained")
    for fused in (False, True):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
        print(f"AdamW step, {'fused' if fused else 'foreach'}: {timed(optimizer.step):.2f} s")


if __name__ == "__main__":
    main()
