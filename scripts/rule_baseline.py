"""A hand-written policy that reads the consultation, as a bar between the constant answer (reads nothing)
and the expert: it asks a generic question about the first field, in a fixed order, that no pharmacist
question so far has asked, and stops once `n` questions were asked or the last one checked allergies.
The order and n are chosen on the training split, then scored on the test prompts the default evaluates.

On the demo data it also prints what the test prompts pay for reading. With the rule's own decisions,
the question is either the generator's question about a field still open (neither asked nor told),
each open field in turn and their rewards averaged (what a policy that knows the open fields but not
the expert's next choice can expect: make_demo.py draws that choice at random among them), or always
the question about one field (a template). All are graded by the config's judge.

    python scripts/rule_baseline.py [--config config.toml] [--set eval.prompts=0 ...]
"""
import argparse
import importlib.util
import itertools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import judge  # noqa: E402
import preprocess  # noqa: E402
from config import load_config  # noqa: E402

ASK = {"trigger": "What makes it worse?", "duration": "How long have you had it?", "severity": "How bad is it?",
       "location": "Where is it?", "nature": "What does it feel like?"}
ASKED = {"trigger": r"worse|come after|start after|sets|brings|cause", "duration": r"how long",
         "severity": r"how bad", "location": r"where|which part", "nature": r"what kind|feel like|is it a"}
TEMPLATES = ("symptom duration", "symptom severity")  # the demo's fields that every complaint has


def answer(sample, order, n):
    asked = [m["content"].lower() for m in sample["messages"] if m["role"] == "assistant"]
    if len(asked) >= n or asked and "allerg" in asked[-1]:
        return judge.STOP
    return next((ASK[f] for f in order if not any(re.search(ASKED[f], a) for a in asked)), judge.STOP)


def mean_reward(reward_fn, samples, order, n):
    scores = reward_fn(samples, [answer(s, order, n) for s in samples])
    return sum(s["reward"] for s in scores) / len(scores)


def demo_bank():
    """make_demo.py's bank: diagnosis -> {field: (the pharmacist's question, the patient's possible answers)}."""
    spec = importlib.util.spec_from_file_location("make_demo", ROOT / "data/demo/make_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return {c["diagn"]: {field: (question, [said for _, said in choices])
                         for field, (question, choices) in {**c["fields"], **demo.GENERIC}.items()}
            for c in demo.COMPLAINTS}


def open_fields(sample, fields):
    """The fields of the sample's complaint that no message has settled: the pharmacist has not asked
    the field's question and the patient has not given one of its answers unasked."""
    said = {m["content"] for m in sample["messages"]}
    return [f for f, (question, answers) in fields.items() if question not in said and not said & set(answers)]


def reading_rows(reward_fn, samples, order, n, bank):
    """{row name: the mean reward over samples} for the reader and each template, under the rule's decisions:
    where the rule stops (or no field is open) the row stops too. A sample's questions count as their mean,
    and each row's are graded in one batch."""
    def mean(pick):
        questions = [pick(s, bank[s["diagn"]]) if answer(s, order, n) != judge.STOP else [] for s in samples]
        questions = [qs or [judge.STOP] for qs in questions]
        scores = iter(reward_fn([s for s, qs in zip(samples, questions) for _ in qs], sum(questions, [])))
        return sum(sum(next(scores)["reward"] for _ in qs) / len(qs) for qs in questions) / len(samples)
    rows = {"a field still open, each in turn (expected)":
            mean(lambda s, fields: [fields[f][0] for f in open_fields(s, fields)])}
    for field in TEMPLATES:
        rows[f"always the {field}"] = mean(lambda s, fields, field=field: [fields[field][0]])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="as l2a.py takes it")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    reward_fn = judge.make_reward_fn(cfg["judge"])
    train = preprocess.load_samples(cfg["data"]["train_file"])
    test = preprocess.load_samples(cfg["data"]["test_file"])[:cfg["eval"]["prompts"] or None]
    order, n = max(((o, n) for o in itertools.permutations(ASK, 3) for n in range(2, 6)),
                   key=lambda c: mean_reward(reward_fn, train, *c))
    print(f"chosen on {len(train)} training samples: ask {', then '.join(order)}; stop after {n} questions")
    print(f"train {mean_reward(reward_fn, train, order, n):.2f}, test ({len(test)} prompts) "
          f"{mean_reward(reward_fn, test, order, n):.2f}")
    bank = demo_bank()
    if all(s.get("diagn") in bank for s in test):
        print("the rule's decisions, with make_demo.py's question about")
        for name, reward in reading_rows(reward_fn, test, order, n, bank).items():
            print(f"  {name}: test {reward:.2f}")


if __name__ == "__main__":
    main()
