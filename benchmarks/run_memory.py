"""Where the default run's resident memory goes on a CPU, part by part, each one measured.

    python benchmarks/run_memory.py [--grpo-steps 2]

- runtime: this process's resident memory after importing torch, Transformers and l2a, before any model;
- trainer state: the bytes of the tensors every step keeps, after one optimizer step of the model as
  l2a loads it: FSDP's float32 master weights, their float32 gradients and AdamW's two float32 moments
  (model.dtype is the compute dtype only);
- activations: what autograd keeps for backward, each storage once and the weights left out
  (saved_tensors_hooks), on the model in its compute dtype: the largest of the default's warm-start
  batches (chained, as l2a.warm_start_step runs them) and a GRPO micro-batch of the default's shape at
  its worst (the two longest training prompts, G answers of max_new_tokens tokens each, shared prompts,
  as l2a.update_policy scores them);
- the run: config.toml cut after its warm start and --grpo-steps GRPO steps, in a child process, its peak
  resident memory and wall time: as l2a runs it; with glibc's malloc_trim(0) after every step, which
  gives the heap's free pages back to the system; and with that and MALLOC_MMAP_THRESHOLD_=1048576 as
  well, which gives every tensor over 1 MiB its own mapping, returned the moment it is freed. The
  differences are memory that glibc holds after it was freed, and what giving it back costs.

Measure alone: the runs' times are part of what is measured.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from torch.autograd.graph import saved_tensors_hooks  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import fsdp  # noqa: E402
import grpo  # noqa: E402
import l2a  # noqa: E402
from config import load_config  # noqa: E402

GIB = 2**30


def resident_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024 / GIB


def state_gib(path, cfg):
    """The tensors a training step keeps, by kind, after one AdamW step of the model as l2a loads it."""
    model = fsdp.load_model(path, cfg, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids).logits.float().mean().backward()
    optimizer.step()
    params = [p.to_local() for p in model.parameters()]  # this rank's shards: the whole model on one rank
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim()]
    return {"float32 weights": sum(p.nbytes for p in params) / GIB,
            "float32 gradients": sum(p.grad.to_local().nbytes for p in model.parameters()) / GIB,
            "AdamW moments (two, float32)": sum(t.to_local().nbytes for t in moments) / GIB}


def kept_gib(model, forward):
    """Bytes autograd keeps for backward during forward(), each storage once, the weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values()) / GIB


def activations_gib(path, cfg, tokenizer):
    task = l2a.load_task(cfg["task"]["name"])
    samples, prompts = l2a.load_split(cfg, task, "train_file", l2a.read_split(task, cfg, "train_file"), tokenizer)
    demos = [task.demonstration(s) for s in samples]
    g, s, seed = cfg["grpo"], cfg["sft"], cfg["train"]["seed"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=fsdp.compute_dtype(cfg["model"]["dtype"],
                                                 torch.device("cpu")), attn_implementation="sdpa").train()
    answers = [l2a.answer_ids(tokenizer, d, g["max_new_tokens"]) for d in demos]
    chains = l2a.demonstration_chains(prompts, answers)
    steps = [l2a.chained_rows(l2a.warm_start_indices(chains, k, s["prompts_per_step"], seed), prompts, answers)
             for k in range(s["steps"])]
    warm_rows, scored = max(steps, key=lambda step: sum(map(len, step[0])))
    warm = kept_gib(model, lambda: grpo.packed_row_logprobs(model, warm_rows, scored, g["logprob_chunk"]))
    longest = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[-cfg["train"]["prompts_per_step"]:]
    prompt, prompt_mask = grpo.left_pad([prompts[i] for i in longest], tokenizer.pad_token_id)
    rows = len(longest) * g["group_size"]
    answers = torch.randint(100, 1000, (rows, g["max_new_tokens"]))
    update = kept_gib(model, lambda: grpo.shared_prompt_logprobs(
        model, prompt, prompt_mask, torch.arange(rows) // g["group_size"], answers, torch.ones_like(answers),
        g["temperature"], g["logprob_chunk"]))
    return {f"activations: the largest warm-start batch ({len(warm_rows)} chained rows, {sum(map(len, warm_rows))} tokens)": warm,
            f"activations: a GRPO micro-batch at its worst ({len(longest)} prompts of "
            f"{sum(len(prompts[i]) for i in longest)} tokens, {rows} answers of {g['max_new_tokens']})": update}


# l2a.py with glibc's malloc_trim(0) after every step, before any evaluation or save builds on the leftovers
TRIMMED = f"""import ctypes, sys
sys.path.insert(0, {str(ROOT)!r})
import l2a
step, libc = l2a.one_step, ctypes.CDLL("libc.so.6")
l2a.one_step = lambda run, k: (step(run, k), libc.malloc_trim(0))[0]
sys.exit(l2a.main(sys.argv[1:]))
"""


def run_gib(grpo_steps, env, trim=False):
    """Peak resident GiB and seconds of config.toml cut after the warm start and grpo_steps GRPO steps."""
    with tempfile.TemporaryDirectory() as out:
        entry = ["-c", TRIMMED] if trim else [str(ROOT / "l2a.py")]
        command = [sys.executable, *entry, "--config", str(ROOT / "config.toml")]
        for setting in (f"train.steps={grpo_steps}", "eval.prompts=2", "eval.constant_prompts=0",
                        f"train.output_dir={json.dumps(out)}"):
            command += ["--set", setting]
        started = time.monotonic()
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
        seconds = time.monotonic() - started
        if result.returncode:
            sys.exit(f"the run failed ({' '.join(command[:3])} ...):\n{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    return max(r.get("peak_memory_mib", 0) for r in rows) / 1024, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grpo-steps", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(ROOT / "config.toml")
    fsdp.setup_distributed()
    path = fsdp.resolve_model_path(cfg["model"]["path"])
    parts = {"runtime: Python, torch, Transformers, l2a": resident_gib()}
    parts.update(state_gib(path, cfg))
    parts.update(activations_gib(path, cfg, AutoTokenizer.from_pretrained(path)))
    runs = {"as l2a runs it": run_gib(args.grpo_steps, {}),
            "with malloc_trim after every step": run_gib(args.grpo_steps, {}, trim=True),
            "with malloc_trim and MALLOC_MMAP_THRESHOLD_=1048576": run_gib(
                args.grpo_steps, {"MALLOC_MMAP_THRESHOLD_": "1048576"}, trim=True)}
    steps = f"{cfg['sft']['steps']} warm-start and {args.grpo_steps} GRPO steps"
    print("| part | GiB |\n|---|---|")
    for name, gib in parts.items():
        print(f"| {name} | {gib:.2f} |")
    for name, (gib, seconds) in runs.items():
        print(f"| the run's peak ({steps}), {name} | {gib:.2f} ({seconds:.0f} s) |")
    fsdp.dist.destroy_process_group()


if __name__ == "__main__":
    main()
