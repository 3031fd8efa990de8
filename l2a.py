"""Learn-to-Ask: train a policy to ask the next useful question, or stop, with GRPO on offline logs.

    torchrun --nproc_per_node N l2a.py --config config.toml [--set section.key=value ...] [--resume]
    python l2a.py --config config.toml                      # one process, same code path

This file is the run: the command line, its set-up, the loop of rollout -> score -> update -> log,
evaluation at the chosen steps and the final table. The algorithm lives in grpo.py; the task (data,
prompt, reward) in the module task.name names (learn_to_ask.py by default); measuring in
evaluation.py; the machinery that makes a run scale and survive in fsdp.py and checkpoint.py.
"""

import argparse
import importlib
import importlib.util
import json
import math
import shutil
import sys
import time
import traceback
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoTokenizer

import grpo
from checkpoint import (RunStopped, StopTraining, check_writable, keep_lines_up_to, latest_checkpoint,
                        load_reference, load_trainer_state, open_output, save_checkpoint, stop_on_signals)
from config import BadInput, load_config
from evaluation import (comparison_table, evaluate, log_step, numeric_fields, plot_curves, progress_numbers,
                        reference_evaluations, write_evaluation)
from fsdp import (any_rank, clipped_step, compute_dtype, gathered, load_model, peak_memory_mib, resolve_model_path,
                  setup_distributed)


# ----------------------------------------------------------------------------- the task and its data

OPTIONAL = {"rollout_metrics": numeric_fields, "CURVES": [("reward", ["reward_mean", "eval_reward"])],
            "demonstration": None, "constant_candidates": None, "stratum": None}


def load_task(name):
    """The task module that task.name names: an import name, or a .py file. learn_to_ask.py lists what a
    task holds; what it leaves out gets OPTIONAL's default."""
    try:
        if name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(name).stem, name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(name)
    except (ImportError, OSError) as e:
        raise BadInput(f"task.name = {name!r}: {e}") from None
    missing = [f for f in ("load_samples", "messages", "make_reward") if not hasattr(module, f)]
    if missing:
        raise BadInput(f"task.name = {name!r} has no {', '.join(missing)}: see learn_to_ask.py for what a task holds")
    return SimpleNamespace(**{**OPTIONAL, **vars(module)})


def read_split(task, cfg, key):
    """The samples of data.<key>; a missing file or a bad line is a BadInput naming file:line."""
    path = cfg["data"][key]
    try:
        return task.load_samples(path)
    except OSError as e:
        raise BadInput(f"data.{key} = {path!r}: {e.strerror}") from None
    except ValueError as e:  # load_samples says file:line: what is wrong
        raise BadInput(str(e)) from None


def encode_prompts(samples, messages, tokenizer, max_tokens):
    """Chat-formatted prompt token ids of messages(sample); samples whose prompt is too long are dropped
    and counted."""
    kept, ids = [], []
    for sample in samples:
        text = tokenizer.apply_chat_template(messages(sample), tokenize=False, add_generation_prompt=True)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) <= max_tokens:
            kept.append(sample)
            ids.append(tokens)
    return kept, ids, len(samples) - len(kept)


def load_split(cfg, task, key, samples, tokenizer, limit=0):
    samples, ids, dropped = encode_prompts(samples, task.messages, tokenizer, cfg["data"]["max_prompt_tokens"])
    if dropped and dist.get_rank() == 0:
        print(f"{cfg['data'][key]}: {dropped} prompts over data.max_prompt_tokens left out", flush=True)
    return (samples[:limit], ids[:limit]) if limit else (samples, ids)


def make_reward(task, cfg):
    """The task's reward function; a setting that cannot work (a bad URL, an unset key) is a BadInput."""
    try:
        return task.make_reward(cfg)
    except ValueError as e:
        raise BadInput(str(e)) from None


def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def step_indices(strata, step, per_step, seed):
    """The training prompts of a step, drawn from `strata` (lists of sample indices; one list: no strata)
    in turn, each with a seeded reshuffle per pass through it: a function of the step alone, so a resumed
    run and a run on another number of ranks see the same prompts. A list that appears w times in `strata`
    is drawn w times per turn (grpo_strata's weights)."""
    picks = []
    for i in range(step * per_step, (step + 1) * per_step):
        turn, slot = divmod(i, len(strata))
        pool = strata[slot]
        same = [j for j, other in enumerate(strata) if other is pool]
        nth, k = turn * len(same) + same.index(slot), same[0]
        # stratum 0's reshuffles are the unstratified order's, so one stratum changes nothing
        picks.append(pool[epoch_order(len(pool), seed + 7919 * k, nth // len(pool))[nth % len(pool)]])
    return picks


def grpo_strata(task, samples, weights):
    """GRPO's prompt strata: the samples grouped by the task's stratum(sample), each group listed as often
    as train.strata weighs it (sorted by key), so that step_indices draws w of its prompts per turn; no
    weights: one list of all samples. Why (Learn-to-Ask: the expert's decision): where one kind of prompt
    is rare (stops are 28% of the demo's), a run of steps without it trains the decision one way only, and
    the policy unlearns the rare one. But the mix drawn is also the prior the policy learns: where it
    cannot tell, the answer that wins is the one that wins on the training mix, so an even mix of stops
    and continues teaches it to stop more often than the experts do."""
    if not weights:
        return [list(range(len(samples)))]
    groups = {key: [] for key in weights}
    for i, sample in enumerate(samples):
        key = task.stratum(sample)
        if key not in groups:
            raise BadInput(f"train.strata weighs {sorted(weights)}, and the task's stratum(sample) also gives "
                           f"{key!r}: give every stratum a weight")
        groups[key].append(i)
    if empty := [key for key, group in groups.items() if not group]:
        raise BadInput(f"train.strata weighs {empty}, and no training sample has that stratum")
    return [groups[key] for key in sorted(groups, key=str) for _ in range(weights[key])]


# ----------------------------------------------------------------------------- rollouts

def rollout(model, tokenizer, prompt_ids, sampling, seeds, group_size):
    """Sample and decode; `sampling` is cfg["grpo"] for training or evaluation.eval_sampling(cfg) for
    evaluation. Every rank calls it, even with no prompts: gathering the parameters is a collective."""
    with gathered(model):
        if not prompt_ids:
            return None, []
        model.eval()
        result = grpo.sample(model, prompt_ids, group_size, sampling["max_new_tokens"], eos_ids(tokenizer),
                             tokenizer.pad_token_id, sampling["temperature"], sampling["top_k"], sampling["top_p"],
                             sampling["stop_strings"], tokenizer, seeds, sampling["repetition_penalty"])
        model.train()
    responses = [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                 for ids, mask in zip(result.completion_ids, result.completion_mask)]
    return result, responses


def answer_ids(tokenizer, text, max_new_tokens):
    """A given answer (a demonstration) as the policy would emit it: its tokens, no longer than a sampled
    answer may be, then EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [eos_ids(tokenizer)[0]]


def demonstration_chains(prompt_ids, answers):
    """The warm start's samples in chains: sample j follows sample i when j's prompt begins with i's prompt
    and answer, as a consultation's next turn does, so one row (the chain's last prompt and answer) holds
    every answer of the chain. A chain is a list of sample indices, each extending the one before."""
    full = [p + a for p, a in zip(prompt_ids, answers)]
    before, stack = {}, []
    # Sorted, a sequence comes before its extensions and so does everything between them, which begins
    # with it too: the prompts-and-answers that begin the current sequence are a stack, longest on top.
    # O(n log n) comparisons, not the n^2 of trying every pair (RealMedConv has thousands of samples).
    turns = [(f, 0, i) for i, f in enumerate(full)] + [(p, 1, j) for j, p in enumerate(prompt_ids)]
    for seq, is_prompt, k in sorted(turns):
        while stack and seq[:len(stack[-1][0])] != stack[-1][0]:
            stack.pop()
        if not is_prompt and not (stack and stack[-1][0] == seq):  # of identical turns, the first listed
            stack.append((seq, k))
        elif is_prompt and stack:
            before[k] = stack[-1][1]
    after = {}
    for j, i in sorted(before.items()):
        after.setdefault(i, j)  # two samples after the same one (a repeated turn): the second starts a chain
    chains = []
    for head in (i for i in range(len(prompt_ids)) if after.get(before.get(i)) != i):
        chains.append([head])
        while chains[-1][-1] in after:
            chains[-1].append(after[chains[-1][-1]])
    return chains


def warm_start_indices(chains, step, per_step, seed):
    """The samples of warm-start step `step`: every sample once per pass, the chains in a seeded reshuffle
    per pass and each chain's samples together, so that most of a step's samples share rows. A function of
    the step alone, like step_indices."""
    n, picks = sum(map(len, chains)), range(step * per_step, (step + 1) * per_step)
    orders = {e: [s for c in epoch_order(len(chains), seed, e) for s in chains[c]] for e in {i // n for i in picks}}
    return [orders[i // n][i % n] for i in picks]


def chained_rows(indices, prompt_ids, answers):
    """A step's warm-start rows: runs of `indices` that chain (each sample's prompt begins with the previous
    one's prompt and answer) share one row, the last one's prompt and answer. Returns the rows' token ids
    and, per row, the positions of its answers' tokens."""
    rows, scored = [], []
    for i in indices:
        p = prompt_ids[i]
        if not rows or p[:len(rows[-1])] != rows[-1]:
            rows.append([]), scored.append([])
        scored[-1] += range(len(p), len(p) + len(answers[i]))
        rows[-1] = p + answers[i]
    return rows, scored


def eos_ids(tokenizer):
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """What the parts of a run share: its settings, its task, its model and data, and how far it got."""
    cfg: dict
    task: SimpleNamespace
    reward_fn: object
    device: torch.device
    out_dir: Path
    tokenizer: object
    model: torch.nn.Module
    reference: torch.nn.Module | None  # the KL's frozen anchor (grpo.kl_coef > 0): the start of GRPO (one_step)
    optimizer: torch.optim.Optimizer
    train: tuple  # (samples, prompt ids)
    test: tuple
    demos: list  # the task's demonstration of each training sample (None where it has none)
    answers: list  # the warm start's targets: each demonstration as the policy would emit it (answer_ids)
    chains: list  # the warm start's samples, in chains of one consultation's turns (demonstration_chains)
    strata: list  # GRPO draws its prompts from these lists of training samples in turn (grpo_strata)
    references: dict  # name -> (summary, rows): the constant and expert rows
    done: int  # steps trained
    streak: int  # the current run of skipped non-finite updates
    recent: deque  # (missing rewards, rollouts) of recent steps, all ranks together
    saved_step: int  # the step of the last save (or of the start)
    saved_at: float  # and its time.monotonic()


def train(cfg, resume=False, task=None):
    """Train as configured and return the output folder: a warm start on the task's demonstrations
    (sft.steps), then GRPO (train.steps). `task` is a task module (learn_to_ask.py says what one holds);
    by default the one task.name names."""
    device = setup_distributed()
    task = task or load_task(cfg["task"]["name"])
    check_settings(cfg, task)
    run = start(cfg, task, device, resume)
    with stop_on_signals() as signalled:
        if run.done == 0:
            # Nothing is trained yet, so a signal may cut this evaluation short (at a 7B scale it can outlast
            # the launcher's grace period); later ones finish, as a step does, so their numbers are whole.
            before = evaluate_at(run, 0, stop=signalled)
            if before is None:
                say(f"stopped during the evaluation before step 1 ({why(signalled)}); nothing was trained, so "
                    f"nothing was saved: run the same command again to start")
                return run.out_dir
            if dist.get_rank() == 0:
                log(run.out_dir, {"step": 0, **before})
        if not train_loop(run, signalled):
            return run.out_dir
    if dist.get_rank() == 0:
        final_table(run)
        plot_curves(run.out_dir, run.task.CURVES)
    return run.out_dir


def check_settings(cfg, task):
    """The settings that cannot work together, found before anything loads."""
    t, g, s, world = cfg["train"], cfg["grpo"], cfg["sft"], dist.get_world_size()
    for section, per_step in (("train", t["prompts_per_step"]), ("sft", s["prompts_per_step"] if s["steps"] else 0)):
        if per_step % world:
            raise BadInput(f"{section}.prompts_per_step={per_step} must divide by the {world} ranks")
    if t["keep_checkpoints"] < 1:
        raise BadInput(f"train.keep_checkpoints = {t['keep_checkpoints']}: keep at least the newest one")
    if (s["steps"] or g["expert_in_group"]) and task.demonstration is None:
        raise BadInput("sft.steps and grpo.expert_in_group learn from the task's demonstrations (an expert's "
                       "answers), and this task has none")
    if not all(type(w) is int and w > 0 for w in t["strata"].values()):
        raise BadInput(f"train.strata = {t['strata']}: each weight is a whole number of prompts per turn, at least 1")
    if t["strata"] and task.stratum is None:
        raise BadInput("train.strata draws GRPO's prompts from the task's strata, and this task defines no "
                       "stratum(sample)")
    if g["group_size"] < 2:  # no group would have two rewards to compare: every step would train nothing
        raise BadInput(f"grpo.group_size = {g['group_size']}: GRPO learns by comparing the answers to one "
                       f"prompt, so a group needs at least 2")


def start(cfg, task, device, resume):
    """Check the inputs, load the model, the optimizer and the data (from the checkpoint when resuming),
    grade the reference rows, and make the output folder ready."""
    t = cfg["train"]
    torch.manual_seed(t["seed"])
    out_dir = Path(t["output_dir"])
    reward_fn = make_reward(task, cfg)
    train_raw, test_raw = read_split(task, cfg, "train_file"), read_split(task, cfg, "test_file")
    checkpoint = open_output(out_dir, resume)
    base_path = resolve_model_path(cfg["model"]["path"])
    model_path = str(checkpoint) if checkpoint else base_path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_model(model_path, cfg, device)
    reference = load_model(base_path, cfg, device, trainable=False) if cfg["grpo"]["kl_coef"] > 0 else None
    # Fused: one kernel over all parameters; on the 135M default (2 cores) a step takes 0.06–0.08 s against
    # the default foreach's 0.29–0.31 s (benchmarks/warm_start.py). CUDA has the same kernel.
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"], fused=True)
    state = load_trainer_state(checkpoint, optimizer, model) if checkpoint else {"step": 0}
    if reference is not None and anchored_to_warm_start(cfg, state["step"]):
        load_reference(checkpoint, reference)
    train_set = load_split(cfg, task, "train_file", train_raw, tokenizer)
    test_set = load_split(cfg, task, "test_file", test_raw, tokenizer, cfg["eval"]["prompts"])
    demos = [task.demonstration(s) for s in train_set[0]] if task.demonstration else []
    if (cfg["sft"]["steps"] or cfg["grpo"]["expert_in_group"]) and None in demos:
        raise BadInput(f"{cfg['data']['train_file']}: sft.steps and grpo.expert_in_group need a demonstration "
                       f"for every training sample (the expert's turn, which preprocess.py writes), and "
                       f"{demos.count(None)} lack one")
    answers = [answer_ids(tokenizer, d, cfg["grpo"]["max_new_tokens"]) for d in demos] if cfg["sft"]["steps"] else []
    chains = demonstration_chains(train_set[1], answers)
    strata = grpo_strata(task, train_set[0], t["strata"])  # before the reference rows: a bad weight fails fast
    references = reference_evaluations(task, train_set[0], test_set[0], reward_fn, cfg["eval"]["constant_prompts"])
    run = Run(cfg, task, reward_fn, device, out_dir, tokenizer, model, reference, optimizer, train_set, test_set,
              demos, answers, chains, strata, references, state["step"], state.get("nonfinite_streak", 0),
              deque(state.get("recent_missing", []), maxlen=t["missing_window"]), state["step"], time.monotonic())
    if dist.get_rank() == 0:
        prepare_folder(run, checkpoint)
        print(f"{dist.get_world_size()} rank(s) on {device} in {compute_dtype(cfg['model']['dtype'], device)}, model "
              f"{model_path}, {len(train_set[0])} train and {len(test_set[0])} test prompts", flush=True)
    return run


def prepare_folder(run, checkpoint):
    """Rank 0: drop what a killed save or an earlier run left that this one will not continue, and write
    the config and the reference rows."""
    out_dir = run.out_dir
    for stale in (out_dir / "checkpoints").glob("*.partial"):  # saves that were killed half way
        shutil.rmtree(stale)
    (out_dir / "config.json").write_text(json.dumps(run.cfg, indent=2))
    # A fresh run drops the logs and evaluations of an earlier one that left no checkpoint to resume
    keep_lines_up_to(out_dir / "metrics.jsonl", run.done if checkpoint else -1)
    keep_lines_up_to(out_dir / "samples.jsonl", run.done if checkpoint else -1)
    if not checkpoint:
        for stale in (out_dir / "eval").glob("step_*"):
            shutil.rmtree(stale)
    for name, (summary, rows) in run.references.items():
        write_evaluation(out_dir / "eval" / name, summary, rows)


def train_loop(run, signalled):
    """The steps from run.done on: the warm start's, then GRPO's. Returns False when a signal stopped it
    (after saving), True once the last step is trained and saved."""
    cfg, rank = run.cfg, dist.get_rank()
    warm, total = cfg["sft"]["steps"], cfg["sft"]["steps"] + cfg["train"]["steps"]
    bar = tqdm(range(run.done, total), initial=run.done, total=total, disable=rank != 0, desc="train")
    try:
        for step in bar:
            metrics = one_step(run, step)
            run.done = step + 1
            run.streak = run.streak + 1 if "nonfinite" in metrics else 0
            if run.done in (warm, total) or (cfg["eval"]["every"] and run.done % cfg["eval"]["every"] == 0):
                metrics.update(evaluate_at(run, run.done))
            if rank == 0:
                log(run.out_dir, metrics)
                bar.set_postfix(progress_numbers(metrics))
                if "nonfinite" in metrics:
                    tqdm.write(f"step {run.done}: non-finite {metrics['nonfinite']}, update skipped; prompts "
                               f"{', '.join(map(str, metrics['nonfinite_cids']))}")
            if run.streak >= cfg["train"]["max_nonfinite_steps"]:
                raise StopTraining(f"{run.streak} steps in a row (to step {run.done}) had a non-finite loss or "
                                   f"gradient norm (train.max_nonfinite_steps = {cfg['train']['max_nonfinite_steps']}"
                                   f"); their updates were skipped, so the weights are the last good ones")
            # Every rank must take these decisions together: a save is a collective.
            stop, due = any_rank(signalled, time.monotonic() - run.saved_at >= 60 * cfg["train"]["save_minutes"])
            if run.done in (warm, total) or stop or due:
                path = save(run)
            if stop and run.done < total:
                say(f"stopped after step {run.done} of {total} ({why(signalled)}) and saved {path}; run the same "
                    f"command with --resume to continue")
                return False
    except StopTraining as e:
        path = save(run) if run.done > run.saved_step else latest_checkpoint(run.out_dir)
        raise RunStopped(f"{e}. " + (f"Saved {path} (step {run.done}); fix the cause, then continue with --resume."
                                     if path else "No step was trained, so there is nothing to resume.")) from None
    return True


def one_step(run, step):
    """Step `step` of the run (from 0), a warm start step or a GRPO one; returns its metrics."""
    cfg, warm = run.cfg, run.cfg["sft"]["steps"]
    if step < warm:
        set_lr(run.optimizer, cfg["sft"]["lr"])
        return warm_start_step(run.model, run.optimizer, *run.train, run.answers, run.chains, cfg, step, run.device)
    if step == warm > 0:  # GRPO starts with fresh AdamW moments: the imitation's are another scale
        run.optimizer.state.clear()
        if run.reference is not None:
            # The KL anchors GRPO to where it starts, the warm-started policy: anchored to the base model,
            # it would pull GRPO back toward what the warm start unlearned (never saying <stop />). From
            # here on the reference is part of the run's state, saved with each checkpoint (save).
            with torch.no_grad():
                for r, p in zip(run.reference.parameters(), run.model.parameters()):
                    r.copy_(p)  # the same sharding on both sides: each rank copies its own shards
    set_lr(run.optimizer, cfg["train"]["lr"])
    # Raises StopTraining before its update when too many rewards are missing: nothing is kept.
    return grpo_step(run, step)


def anchored_to_warm_start(cfg, done):
    """Whether, after `done` steps, the KL's reference is the warm-started policy (copied at the switch in
    one_step), which only a checkpoint can give back, rather than the model as loaded."""
    return done > cfg["sft"]["steps"] > 0


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def save(run):
    path = save_checkpoint(run.model, run.optimizer, run.tokenizer, run.done,
                           {"nonfinite_streak": run.streak, "recent_missing": list(run.recent)}, run.out_dir,
                           run.cfg["train"]["keep_checkpoints"],
                           run.reference if anchored_to_warm_start(run.cfg, run.done) else None)
    run.saved_step, run.saved_at = run.done, time.monotonic()
    return path


def why(signalled):
    return signalled[0] if signalled else "a signal to another rank"


def say(text):
    if dist.get_rank() == 0:
        tqdm.write(text)


def evaluate_at(run, step, stop=None):
    """Evaluate, keep the rollouts under eval/step_N/, and return the summary as eval_* metrics (None when
    a signal in `stop` cut the evaluation short)."""
    summary, rows = evaluate(partial(rollout, run.model, run.tokenizer), *run.test, run.cfg, run.reward_fn,
                             run.task.rollout_metrics, stop)
    if summary is None:
        return None
    if dist.get_rank() == 0:
        write_evaluation(run.out_dir / "eval" / f"step_{step}", summary, rows)
    return {f"eval_{name}": m["mean"] for name, m in summary.items()}


def final_table(run):
    """Rank 0: the evaluations before, after the warm start and at the end, beside the reference rows."""
    warm, total = run.cfg["sft"]["steps"], run.cfg["sft"]["steps"] + run.cfg["train"]["steps"]
    files = {f"step_{s}": run.out_dir / "eval" / f"step_{s}" / "metrics.json" for s in dict.fromkeys((0, warm, total))}
    summaries = {name: json.loads(path.read_text()) for name, path in files.items() if path.exists()}
    summaries.update({name: summary for name, (summary, _) in run.references.items()})
    table = comparison_table(summaries)
    (run.out_dir / "eval" / "comparison.md").write_text(table)
    print("test split, before and after training" + (", against the reference rows (" + " and ".join(run.references)
          + ")" if run.references else "") + ":\n" + table, flush=True)


def log(out_dir, metrics):
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


# ----------------------------------------------------------------------------- one step

def grpo_step(run, step):
    """One GRPO step on this rank's share of the step's prompts, in its four phases: sample (rollout),
    score (score_rollouts), update (update_policy), log (log_step). Returns the step's metrics."""
    cfg, (samples, prompt_ids), tokenizer = run.cfg, run.train, run.tokenizer
    t, G = cfg["train"], cfg["grpo"]["group_size"]
    rank, started = dist.get_rank(), time.perf_counter()
    per_rank = t["prompts_per_step"] // dist.get_world_size()
    # A GRPO step's prompts and seeds do not depend on a warm start: runs with and without one see the same
    nth = step - cfg["sft"]["steps"]
    indices = step_indices(run.strata, nth, t["prompts_per_step"], t["seed"])[rank * per_rank:][:per_rank]
    seeds = grpo.row_seeds(t["seed"], nth, rank * per_rank, per_rank, G)
    result, responses = rollout(run.model, tokenizer, [prompt_ids[i] for i in indices], cfg["grpo"], seeds, G)
    times = {"sampling_time": time.perf_counter() - started}
    row_samples = [samples[i] for i in indices for _ in range(G)]
    # Each group's guide is graded beside its draws, and takes the last draw's place only where it is needed.
    guided = [i for i in indices if cfg["grpo"]["expert_in_group"]]
    guides = [answer_ids(tokenizer, run.demos[i], cfg["grpo"]["max_new_tokens"]) for i in guided]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in guides]
    scores, rewards, judge_stats = score_rollouts(run.reward_fn, row_samples + [samples[i] for i in guided],
                                                  responses + texts, cfg, run.recent)
    B = len(responses)
    if guides:
        needed = grpo.guide_needed(rewards[:B], rewards[B:], G)
        result = grpo.with_guides(result, [g if n else None for g, n in zip(guides, needed)], G, tokenizer.pad_token_id)
        for j in needed.nonzero().flatten().tolist():
            last = j * G + G - 1
            responses[last], scores[last], rewards[last] = texts[j], scores[B + j], rewards[B + j]
    scores, rewards = scores[:B], rewards[:B]
    updated = time.perf_counter()
    advantages, totals, grad_norm, fault = update_policy(run.model, run.reference, run.optimizer, result, rewards, cfg)
    times["update_time"] = time.perf_counter() - updated
    prompts = [tokenizer.decode(prompt_ids[i]) for i in indices]
    drawn = result.sampled if result.sampled is not None else torch.ones_like(result.finished)
    rows = [{"cid": s["cid"], "prompt": prompts[j // G], "response": r, "advantage": a.item(), "length": n.item(),
             "finished": f.item(), **({} if drawn[j] else {"expert": True}), **grade}
            for j, (s, r, a, n, f, grade) in enumerate(zip(row_samples, responses, advantages,
                                                           result.completion_mask.sum(1), result.finished, scores))]
    totals["prompt_tokens"] = result.prompt_mask[::G].sum().item()  # each prompt once, as the trainer runs it
    metrics = log_step(step, rows, totals, judge_stats, grad_norm, fault, times, cfg, run.device, run.out_dir)
    return {**metrics, "step_time": time.perf_counter() - started}


def warm_start_step(model, optimizer, samples, prompt_ids, answers, chains, cfg, step, device):
    """One supervised step on the task's demonstrations (Learn-to-Ask: the experts' next turns), answers[i]
    the token ids of the answer to samples[i] (answer_ids, EOS last): the cross-entropy of each answer given
    its prompt, which is minus the log-probs the trainer already scores answers with
    (grpo.token_logprobs), averaged over the batch's tokens on every rank.

    Why before GRPO: a policy that never samples <stop /> is never rewarded for it, so GRPO alone cannot
    teach it when to stop, and a small model's first questions are rarely about the consultation.
    Imitating the experts puts both within reach, and GRPO then chooses among what it samples. The
    Learn-to-Ask paper reports SFT as a baseline that its RL beats; this is that baseline as a start."""
    t, s = cfg["train"], cfg["sft"]
    rank, world, started = dist.get_rank(), dist.get_world_size(), time.perf_counter()
    per_rank = s["prompts_per_step"] // world
    indices = warm_start_indices(chains, step, s["prompts_per_step"], t["seed"])[rank * per_rank:][:per_rank]
    # Micro-batches of samples, not rows: every rank then runs as many forwards as the others, which FSDP's
    # collectives need, however its samples chain. Within one, a chain's turns share a row (chained_rows):
    # the demo's steps hold ~2.3x fewer tokens than row by row.
    batches = [chained_rows(indices[b:b + t["micro_batch_size"]], prompt_ids, answers)
               for b in range(0, per_rank, t["micro_batch_size"])]
    tokens = torch.tensor(float(sum(len(k) for _, scored in batches for k in scored)), device=device)
    dist.all_reduce(tokens)  # the global token count, before any backward: ranks and micro-batches weigh alike
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for rows, scored in batches:
        with grpo.recomputed_layers(model) if cfg["model"]["gradient_checkpointing"] else nullcontext():
            logprobs = grpo.packed_row_logprobs(model, rows, scored, cfg["grpo"]["logprob_chunk"])
        loss = -logprobs.sum() / tokens
        loss.backward()
        loss_sum += loss.item()
    grad_norm, fault = clipped_step(model, optimizer, loss_sum, t["grad_clip"])
    loss = torch.tensor([loss_sum], dtype=torch.float64)
    dist.all_reduce(loss)  # each rank's share is already over the global token count: they add up
    return {"step": step + 1, "sft_loss": loss.item(), "sft_tokens": tokens.item(),
            "grad_norm": None if fault else grad_norm.item(), "updated": fault is None,
            **({"nonfinite": fault, "nonfinite_cids": sorted(samples[i]["cid"] for i in indices)} if fault else {}),
            "step_time": time.perf_counter() - started, "peak_memory_mib": peak_memory_mib(device)}


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
    if missing > cfg["train"]["max_missing_fraction"]:
        raise StopTraining(f"the reward function (the judge) gave no reward for {missing:.0%} of the rollouts of the "
                           f"last {len(window)} step(s), over train.max_missing_fraction = "
                           f"{cfg['train']['max_missing_fraction']}")
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
    share, recompute = grpo.prompt_sharing(model, G), cfg["model"]["gradient_checkpointing"]
    normalizer = grpo.loss_normalizer(mask, g["aggregation"], g["max_new_tokens"])
    dist.all_reduce(normalizer)
    batches = [slice(i, i + t["micro_batch_size"]) for i in range(0, len(mask), t["micro_batch_size"])]
    old_logprobs, ref_logprobs, totals, grad_norm, fault = {}, {}, {}, None, None
    for mu in range(g["inner_updates"] if normalizer > 0 else 0):
        optimizer.zero_grad(set_to_none=True)
        update_loss = 0.0
        for b in batches:
            logprobs, entropy = grpo.score_rows(model, result, b, G, share, g["temperature"] or 1.0, g["logprob_chunk"],
                                                recompute)
            width = logprobs.size(1)
            m = mask[b, :width]
            if mu == 0:  # the sampling policy, recomputed by the trainer so both sides of rho match
                old_logprobs[b.start] = logprobs.detach()
                add(totals, first_update_tokens=m.sum().item(), entropy=(entropy * m).sum().item(),
                    sampler_gap=((logprobs.detach() - result.logprobs[b, :width]).abs() * m *
                                 (1 if result.sampled is None else result.sampled[b, None])).sum().item())
                if reference is not None:  # frozen: the same for every update
                    with torch.no_grad():
                        ref_logprobs[b.start], _ = grpo.score_rows(reference, result, b, G, share,
                                                                   g["temperature"] or 1.0, g["logprob_chunk"])
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


def add(totals, **values):
    for k, v in values.items():
        totals[k] = totals.get(k, 0.0) + v


# ----------------------------------------------------------------------------- --eval and the command line

def evaluate_models(cfg, checkpoints):
    """--eval: each model (a checkpoint folder, or "base" for model.path) on the test split with the
    evaluation protocol, beside the task's reference rows; per-model metrics and rollouts under
    output_dir/eval/<name>/, and one table."""
    device = setup_distributed()
    task = load_task(cfg["task"]["name"])
    reward_fn = make_reward(task, cfg)
    out_dir = Path(cfg["train"]["output_dir"]) / "eval"
    train_raw, test_raw = read_split(task, cfg, "train_file"), read_split(task, cfg, "test_file")
    check_writable(out_dir)
    paths = {given: resolve_model_path(cfg["model"]["path"] if given == "base" else given)
             for given in checkpoints or ["base"]}
    summaries = {}
    for given, path in paths.items():
        name = Path(given).name if Path(given).name not in summaries else given.strip("/").replace("/", "_")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_model(path, cfg, device, trainable=False)
        samples, ids = load_split(cfg, task, "test_file", test_raw, tokenizer, cfg["eval"]["prompts"])
        summaries[name], rows = evaluate(partial(rollout, model, tokenizer), samples, ids, cfg, reward_fn,
                                         task.rollout_metrics)
        if dist.get_rank() == 0:
            write_evaluation(out_dir / name, summaries[name], rows)
        del model
    train_samples, _ = load_split(cfg, task, "train_file", train_raw, tokenizer)
    for name, (summary, rows) in reference_evaluations(task, train_samples, samples, reward_fn,
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
        cfg = json.loads((Path(args.plot) / "config.json").read_text())
        print(plot_curves(args.plot, load_task(cfg["task"]["name"]).CURVES))
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
