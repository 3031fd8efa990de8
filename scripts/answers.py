"""A run's answers before and after training, side by side, for prompts chosen by a fixed rule (never
by hand): the first rollout of the first N test prompts of each expert decision, in file order. Then,
for every evaluation of the run, the counts that tell learning from a template: how many of the
answers to continue prompts are distinct, their commonest opening, and how often <stop /> was said;
and how often it was said against how many questions about the complaint the pharmacist had already
asked, and whether the allergy check came (beside how often the expert stopped there, in the training
split), which shows whether a run stops by reading the consultation or by counting turns.

    python scripts/answers.py runs/demo            # N = 4 continue and 2 stop prompts
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

STOP = "<stop />"


def rollouts(folder):
    return {(r["cid"], r["rollout"]): r for r in map(json.loads, open(folder / "rollouts.jsonl"))}


def cell(row):
    text = " ".join(row["response"].split()).replace("|", "\\|")
    return f"{text} (**{row['reward']:.1f}**)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--continue", dest="n_continue", type=int, default=4)
    parser.add_argument("--stop", dest="n_stop", type=int, default=2)
    a = parser.parse_args()
    evals = sorted(Path(a.run_dir, "eval").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    if not evals:
        sys.exit(f"{a.run_dir} holds no evaluation (eval/step_N/); give a run's folder, e.g. runs/v4/default/seed0")
    runs = {folder.name: rollouts(folder) for folder in evals}
    before, after = runs[evals[0].name], runs[evals[-1].name]
    config = json.loads(Path(a.run_dir, "config.json").read_text())
    samples, train = ([json.loads(line) for line in open(config["data"][key])] for key in ("test_file", "train_file"))
    tested = {cid for cid, _ in before}
    chosen = [s for decision, n in (("continue", a.n_continue), ("stop", a.n_stop))
              for s in [s for s in samples if s["cid"] in tested and s["decision_truth"] == decision][:n]]
    print(f"| expert next (info asked) | last patient message | {evals[0].name} | {evals[-1].name} |\n|---|---|---|---|")
    for s in chosen:
        truth = s["decision_truth"] + (f" ({'; '.join(s['info_truth'])})" if s["info_truth"] else "")
        last = next(m["content"] for m in reversed(s["messages"]) if m["role"] == "user")
        print(f"| {truth} | {last} | {cell(before[(s['cid'], 0)])} | {cell(after[(s['cid'], 0)])} |")
    decision = {s["cid"]: s["decision_truth"] for s in samples}
    print("\n| evaluation | distinct continue answers | commonest opening (first 3 words) | <stop /> said on stop "
          "prompts | on continue prompts |\n|---|---|---|---|---|")
    for name, rows in runs.items():
        print(counts(name, rows.values(), decision))
    print()
    print("\n".join(by_questions_asked({name: rows.values() for name, rows in runs.items()}, samples, train)))


def asked(sample):
    """What the pharmacist has asked so far: (how many turns asked about the complaint, whether the allergy
    check came). A turn asks when it holds a question; a greeting ("How can I help you?", before the patient
    has said anything) asks nothing about the complaint, and the allergy check is told apart because in the
    demo data the expert always stops after it, while how many questions come before it is drawn at random
    (data/demo/make_demo.py)."""
    first = next((i for i, m in enumerate(sample["messages"]) if m["role"] == "user"), len(sample["messages"]))
    turns = [m["content"] for m in sample["messages"][first:] if m["role"] == "assistant" and "?" in m["content"]]
    checked = any("allerg" in t.lower() for t in turns)
    return len(turns) - checked, checked


def by_questions_asked(evaluations, samples, train):
    """A table: per questions asked before the prompt (asked), the training prompts where the expert
    stopped and went on, the tested ones, then for each evaluation (name -> rows) the <stop /> said on
    each kind."""
    kind = {s["cid"]: (asked(s), s["decision_truth"]) for s in samples}
    in_train = Counter((asked(s), s["decision_truth"]) for s in train)
    tested = Counter(kind[c] for c in {r["cid"] for rows in evaluations.values() for r in rows})
    said = {name: Counter((*kind[r["cid"]], STOP in r["response"]) for r in rows) for name, rows in evaluations.items()}
    lines = ["| questions about the complaint asked before | training prompts: expert stopped / went on | tested prompts: the same | "
             + " | ".join(f"{name}: <stop /> said (expert stopped / went on)" for name in evaluations) + " |",
             "|---|---|---|" + "---|" * len(evaluations)]
    for k in sorted({k for k, _ in in_train + tested}):
        cells = [" / ".join(f"{n[(k, d, True)]} of {n[(k, d, True)] + n[(k, d, False)]}" for d in ("stop", "continue"))
                 for n in said.values()]
        lines.append(f"| {k[0]}{', then the allergy check' if k[1] else ''} | {in_train[(k, 'stop')]} / {in_train[(k, 'continue')]} | "
                     f"{tested[(k, 'stop')]} / {tested[(k, 'continue')]} | " + " | ".join(cells) + " |")
    return lines


def counts(name, rows, decision):
    """One row of the counts table; answers are compared with their whitespace normalised."""
    answers = {d: [" ".join(r["response"].split()) for r in rows if decision[r["cid"]] == d] for d in ("continue", "stop")}
    cont = answers["continue"]
    opening, n = Counter(" ".join(a.split()[:3]) for a in cont).most_common(1)[0] if cont else ("", 0)
    said = {d: f"{sum(STOP in a for a in answers[d])} of {len(answers[d])}" for d in answers}
    return (f"| {name} | {len(set(cont))} of {len(cont)} | {opening.replace('|', chr(92) + '|')!r} ({n}) | "
            f"{said['stop']} | {said['continue']} |")


if __name__ == "__main__":
    main()
