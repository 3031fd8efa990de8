"""Measuring: a policy by k rollouts per test prompt graded by the task's reward, beside the two reference
rows it is read against (a constant answer and the expert's own), with their spread and the comparison
table; a training step by its metrics; a run by its curves."""

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from fsdp import gather_rows, my_share, peak_memory_mib
from grpo import row_seeds


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


def evaluate(generate, samples, prompt_ids, cfg, reward_fn, rollout_metrics, stop=None):
    """k rollouts per test prompt with the evaluation sampling settings, graded; each rank takes a share.
    generate(prompt_ids, sampling, seeds, k) returns (the rollout, its decoded answers): l2a.rollout on a model.
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
        _, responses = generate([prompt_ids[i] for i in part], eval_sampling(cfg),
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


def reference_evaluations(task, train_samples, test_samples, reward_fn, chosen_on):
    """The rows every evaluation is read against, as summaries like evaluate's, where the task has them:
    "constant", the one answer of task.constant_candidates that scores best on (up to `chosen_on` of)
    the training prompts, said to every test prompt, which is what a policy that reads nothing can
    reach; "expert", the task's demonstration on each test prompt (Learn-to-Ask: the expert's own next
    turn), the judge's ceiling. Both are fixed answers, graded once (spread 0); the grading is shared
    out over the ranks, since an LLM judge makes it thousands of calls (about 30 candidates times
    `chosen_on`, which eval.constant_prompts bounds; its cache keeps them after)."""
    if not chosen_on:
        return {}
    pairs = {}
    if task.constant_candidates:
        chosen_on = train_samples[:chosen_on]
        candidates = task.constant_candidates(train_samples)
        scores = graded([(s, c) for c in candidates for s in chosen_on], reward_fn)
        means = [mean_scores(scores[i * len(chosen_on):(i + 1) * len(chosen_on)]).get("reward", -math.inf)
                 for i in range(len(candidates))]
        constant = candidates[max(range(len(candidates)), key=means.__getitem__)]
        pairs["constant"] = [(s, constant) for s in test_samples]
    if task.demonstration:
        answered = [(s, task.demonstration(s)) for s in test_samples]
        pairs["expert"] = [(s, answer) for s, answer in answered if answer is not None]
    rows = {}
    for name, answered in pairs.items():
        rows[name] = [{"cid": s["cid"], "rollout": 0, "response": r, **score,
                       "metrics": task.rollout_metrics(s, score)}
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


# (panel title, metrics.jsonl keys drawn in it), after the task's own panels (its CURVES); a panel whose
# values never move is left out
CURVES = [
    ("entropy (a collapse onto a template shows here first)", ["entropy"]),
    ("warm start loss", ["sft_loss"]),
    ("KL", ["approx_kl", "ref_kl"]),  # 0 by construction at inner_updates = 1, without a reference
    ("clip fraction", ["clip_fraction"]),  # likewise
    ("completion length", ["completion_length_mean"]),
    ("step time (s)", ["step_time"]),
]
SMOOTHING = 10  # steps in the moving mean drawn over a noisy per-step training curve


def curve_panels(rows, references, task_curves):
    """What plot_curves draws: [(title, {label: [(step, value), ...]}, {label: level})], the panels of
    task_curves + CURVES that have a value other than their first, each training curve beside its moving
    mean over SMOOTHING steps, and in the reward panel the references' rewards as levels."""
    panels = []
    for title, keys in task_curves + CURVES:
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


def plot_curves(run_dir, task_curves):
    """Draw run_dir/metrics.jsonl into run_dir/curves.png (curve_panels), with the constant and expert rows of
    run_dir/eval/ where the run wrote them; returns the path."""
    # matplotlib keeps a font cache in ~/.cache unless told otherwise; a run writes only under its folder
    os.environ.setdefault("MPLCONFIGDIR", str(Path(run_dir) / ".matplotlib"))
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # the levels of the metric that the task's reward panel draws for the test split
    metric = next((k[5:] for k in dict(task_curves).get("reward", []) if k.startswith("eval_")), "reward")
    references = {name: json.loads(path.read_text())[metric]["mean"]
                  for name in ("constant", "expert") if (path := Path(run_dir) / "eval" / name / "metrics.json").exists()}
    panels = curve_panels(rows, references, task_curves)
    columns = min(4, max(len(panels), 1))
    fig, axes = plt.subplots(math.ceil(len(panels) / columns) or 1, columns, figsize=(4.5 * columns, 3.8 *
                             max(1, math.ceil(len(panels) / columns))), squeeze=False)
    for ax, (title, lines, levels) in zip(axes.flat, panels):
        for label, points in lines.items():
            raw = label in dict(task_curves + CURVES).get(title, []) and f"{label} (mean of {SMOOTHING})" in lines
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

