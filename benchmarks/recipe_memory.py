"""GPU memory per rank of the real recipe (Qwen2.5-7B-Instruct, configs/qwen7b.toml), from its published
architecture, without a GPU:

    python benchmarks/recipe_memory.py                      # 8 ranks, 1024-token prompts and answers
    python benchmarks/recipe_memory.py --ranks 16 --prompt-tokens 2048

The sharded state and the sampler's KV cache are arithmetic on the parameter and head counts. The
activations that backward keeps are measured: a one-layer model of the 7B layer's shape runs the trainer's
shared-prompt scoring forward in bf16 on CPU, with and without recomputed layers
(grpo.recomputed_layers, model.gradient_checkpointing), and every tensor autograd saves is counted
(saved_tensors_hooks); 28 layers keep 28 times one layer's share. Under recomputation the hooks see only
what is saved outside the layers; what the layers hold besides (each layer's input, the prompts' keys and
values) is added by arithmetic, and so is one layer's full share while it is recomputed. The CPU's attention saves what FlashAttention's does (the output and one float per query and
head), so the count carries over; allocator slack and CUDA's own context (~1 GiB) are not in it.
"""
import argparse
import contextlib
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402

# Qwen2.5-7B-Instruct's config.json
QWEN7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
GIB = 2**30


def saved_bytes(model, prompts, rows, prompt_tokens, completion_tokens, recompute):
    """Bytes autograd keeps for backward after one shared-prompt scoring forward of `rows` answers to
    `prompts` prompts."""
    saved = []

    def keep(t):
        saved.append(t.numel() * t.element_size())
        return t

    prompt = torch.randint(100, 1000, (prompts, prompt_tokens))
    answers = torch.randint(100, 1000, (rows, completion_tokens))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            grpo.recomputed_layers(model) if recompute else contextlib.nullcontext():
        grpo.shared_prompt_logprobs(model, prompt, torch.ones_like(prompt), torch.arange(rows) * prompts // rows,
                                    answers, torch.ones_like(answers))
    return sum(saved)


def token_bytes(recompute, layers):
    """Saved bytes per prompt token and per answer token of a `layers`-layer model (three small runs, solved)."""
    config = AutoConfig.for_model(**{**QWEN7B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").train()
    runs = [(1, 2, 64, 32), (1, 2, 128, 32), (1, 2, 64, 64)]  # (prompts, rows, prompt tokens, answer tokens)
    base, more_prompt, more_answer = (saved_bytes(model, *r, recompute) for r in runs)
    return torch.tensor([(more_prompt - base) / 64, (more_answer - base) / (32 * 2)])


def activation_bytes(recompute, layers):
    """Saved bytes per (prompt token, answer token) of the whole `layers`-layer model, and one layer's
    share: a two-layer model less a one-layer one, times `layers`, plus what lies outside the layers."""
    one, two = (token_bytes(recompute, n) for n in (1, 2))
    return (one - (two - one)) + layers * (two - one), two - one


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--completion-tokens", type=int, default=1024, help="grpo.max_new_tokens (the worst case)")
    parser.add_argument("--group-size", type=int, default=5)
    parser.add_argument("--prompts-per-step", type=int, default=64)
    a = parser.parse_args()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN7B))
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    c = QWEN7B
    state = 16 * params / a.ranks  # float32 master shard, its gradient, AdamW's two moments
    kv_per_token = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"] * 2
    rows = a.prompts_per_step * a.group_size // a.ranks
    sampling = 2 * params + rows * (a.prompt_tokens + a.completion_tokens) * kv_per_token  # gathered bf16 weights
    gathered_in_update = 2 * (params - c["num_hidden_layers"] * layer) + 2 * 2 * layer  # the root's and two layers' bf16
    head_chunk = 3 * 2048 * c["vocab_size"] * 4  # logits, log-softmax and its gradient of one 2048-token chunk
    print(f"Qwen2.5-7B: {params / 1e9:.2f}B parameters, {a.ranks} ranks, {rows} rollouts per rank, prompts of "
          f"{a.prompt_tokens} and answers of {a.completion_tokens} tokens\n")
    print(f"sharded state (float32 weights, gradients, AdamW moments): {state / GIB:.1f} GiB per rank")
    print(f"sampling: bf16 weights gathered for the phase {2 * params / GIB:.1f} GiB + KV cache of {rows} rows "
          f"{(sampling - 2 * params) / GIB:.1f} GiB\n")
    layers = c["num_hidden_layers"]
    plain, one_layer = activation_bytes(False, layers)
    outside, _ = activation_bytes(True, layers)
    # Under recomputation each layer also holds its input (bf16 hidden states) and the prompts' keys and
    # values (kept for the answers), and the layer being recomputed its full share once more.
    held = torch.tensor([layers * c["hidden_size"] * 2 + kv_per_token, layers * c["hidden_size"] * 2])
    recomputed = outside + held + one_layer
    print("| micro_batch_size | scoring | activations GiB | update peak GiB |\n|---|---|---|---|")
    for label, per_token in (("shared prompts", plain), ("shared prompts, recomputed layers", recomputed)):
        for micro in (1, 2, a.group_size, 8, 2 * a.group_size):
            # the most groups one micro-batch of this rank's rows touches: each runs its prompt once
            prompt_runs = max(len({r // a.group_size for r in range(i, min(i + micro, rows))})
                              for i in range(0, rows, micro))
            activations = prompt_runs * a.prompt_tokens * per_token[0] + micro * a.completion_tokens * per_token[1]
            update = state + gathered_in_update + float(activations) + head_chunk
            print(f"| {micro} | {label} | {float(activations) / GIB:.1f} | {update / GIB:.1f} |")
    print(f"\nsampling peak: {(12 * params / a.ranks + sampling) / GIB:.1f} GiB (gradients are freed by then)")

if __name__ == "__main__":
    main()
