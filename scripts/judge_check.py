"""Check the rules judge from both sides before trusting a run it graded.

    python scripts/judge_check.py                                # recall on the experts' own questions
    python scripts/judge_check.py runs/sweep/default/seed0       # and what it pays in a run's logs

Recall: every continue sample's next pharmacist turn (its expert_turn) is a question that asks about the sample's info, so a good judge gives it content 1.
A run's logs: every logged training answer to a continue prompt is graded again with today's judge;
the answers it pays content 1 are listed, so that a shortcut the policy found shows up by eye. Also
counted: the logged rewards today's rules would change (none: the run is what today's code repeats),
and the answers that stop (a policy that never samples a stop gets no gradient toward stopping).
"""
import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import judge  # noqa: E402
import preprocess  # noqa: E402


def expert_questions(samples):
    """(sample, the expert's next turn) for each continue sample whose next turn the data holds."""
    return [(s, s["expert_turn"]) for s in samples if s["decision_truth"] == "continue" and s["expert_turn"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="run folders whose samples.jsonl to grade again")
    parser.add_argument("--data", nargs="+", default=[str(ROOT / "data/demo/train.jsonl"),
                                                      str(ROOT / "data/demo/test.jsonl")])
    parser.add_argument("--show", type=int, default=10, help="content-1 answers to print per run")
    args = parser.parse_args()
    samples = [s for path in args.data for s in preprocess.load_samples(path)]
    rules = judge.RulesJudge()
    pairs = expert_questions(samples)
    missed = [(s, q) for s, q in pairs if rules.grade(s, q)["content"] != 1.0]
    print(f"experts' next questions graded content 1: {len(pairs) - len(missed)} of {len(pairs)}")
    for s, q in missed[:args.show]:
        print(f"  missed: {q!r} for {s['info_truth']}")
    by_cid = {s["cid"]: s for s in samples}
    for run in args.runs:
        config = json.loads((Path(run) / "config.json").read_text())
        reward = judge.make_reward_fn({"backend": "rules", "fusion": config["judge"]["fusion"]})
        paid, graded, stops, logged_rewards, changed = [], 0, 0, 0, 0
        for line in open(Path(run) / "samples.jsonl"):
            logged = json.loads(line)
            s = by_cid[logged["cid"]]
            for c in logged["completions"]:
                stops += judge.STOP in c["response"]
                logged_rewards += 1
                changed += reward([s], [c["response"]])[0]["reward"] != c["reward"]
                if s["decision_truth"] == "continue" and judge.STOP not in c["response"]:
                    graded += 1
                    verdict = rules.grade(s, c["response"])
                    if verdict["content"] == 1.0:
                        paid.append((logged["step"], c["response"], verdict["reasoning"]))
        print(f"{run}: {changed} of {logged_rewards} logged rewards differ under today's rules; "
              f"{stops} logged answers hold {judge.STOP}; "
              f"{len(paid)} of {graded} continue answers graded content 1, a random {args.show}:")
        for step, response, why in random.Random(0).sample(paid, min(args.show, len(paid))):
            print(f"  step {step}: {' '.join(response.split())!r} ({why})")


if __name__ == "__main__":
    main()
