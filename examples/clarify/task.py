"""Clarify: ask before answering. A second l2a task (config key task.name), and a template to fork.
A request is clear ("What is the capital of France?": answer it, no question) or lacks one thing the
assistant must know ("Set an alarm.": ask one short question about it, what time). A sample is {"cid",
"request", "demo"} (a good reply) plus "answer" (keywords a right answer contains) or "missing" (a key of
SLOTS). The reward is a few deterministic rules, no judge."""

import json
import re

# One vocabulary for every slot, not one per sample, so that a question naming every slot at once
# ("When, where, for whom?") is caught: another slot's word, unless the request uses it, forfeits the slot.
SLOTS = {"time": ["when", "time", "day", "date", "hour", "o'clock"], "language": ["language"],
         "place": ["where", "city", "location", "place", "area", "address"],
         "recipient": ["who", "whom", "recipient", "contact"], "unit": ["celsius", "fahrenheit", "unit", "scale"],
         "amount": ["how much", "how many", "amount", "value", "sum"], "currency": ["currency", "euro", "pound", "yen"],
         "music": ["song", "artist", "genre", "band", "music", "listen"],
         "people": ["how many", "people", "person", "guest", "ways"],
         "duration": ["how long", "how much", "how many", "minute", "second", "hour", "duration"]}
MAX_WORDS = 20  # a rambling reply scores 0: keyword-stuffing needs words, and the point is to be brief
SYSTEM = ("You are a helpful assistant. If a request lacks something you must know to carry it out, ask "
          "one short question about it. Otherwise answer it directly and briefly, without questions.")

CURVES = [("reward", ["reward_mean", "eval_reward"]),
          ("asking rate on test (ambiguous should be 1, clear 0)", ["eval_asked_ambiguous", "eval_asked_clear"]),
          ("reward components (training)", ["reward_asked", "reward_named"])]


def load_samples(path):
    samples, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                if line.strip():
                    samples.append(check(json.loads(line), seen))
            except ValueError as e:  # a JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return samples


def check(s, seen):
    if not isinstance(s, dict) or not all(isinstance(s.get(k), str) and s[k].strip() for k in ("cid", "request", "demo")):
        raise ValueError("expected a JSON object with non-empty strings 'cid', 'request' and 'demo'")
    if s["cid"] in seen:
        raise ValueError(f"duplicate cid {s['cid']!r}")
    if ("answer" in s) == ("missing" in s):
        raise ValueError("give exactly one of 'answer' (a clear request) and 'missing' (an ambiguous one)")
    if "missing" in s and s["missing"] not in SLOTS:
        raise ValueError(f"unknown slot {s['missing']!r}; known: {', '.join(SLOTS)}")
    if "answer" in s and not (isinstance(s["answer"], list) and s["answer"]
                              and all(isinstance(w, str) and w.strip() for w in s["answer"])):
        raise ValueError("'answer' must be a non-empty list of non-empty strings")
    seen.add(s["cid"])
    return s


def demonstration(sample):  # the warm start imitates it, and it is the "expert" reference row
    return sample["demo"]


def constant_candidates(samples):  # replies that read nothing: the "constant" reference row, the bar to beat
    return ["Could you tell me more?", "Which one do you mean?", "Sure, done.", "What time?"]


def messages(sample):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sample["request"]}]


def names(text, word):
    # A word's start, then an optional plural: "3.1" finds "3.11 miles" and "minute" finds "minutes",
    # but "Au" does not find "August", nor "who" "whole".
    return re.search(r"(?<![\w.])" + re.escape(word) + r"s?(?![a-z])", text, re.IGNORECASE) is not None


def score(sample, reply):
    text = reply.strip()
    words = len(re.findall(r"\w+", text))
    short = words <= MAX_WORDS
    asked = "?" in text
    if "answer" in sample:  # clear: a short reply with no question earns 1 (the right decision), the answer 1 more
        named = short and any(names(text, w) for w in sample["answer"])
        reward = (short and not asked) * (1.0 + named)
    else:  # ambiguous: one question earns 1, naming the missing slot (and no other slot) 1 more
        own = SLOTS[sample["missing"]]
        others = {w for ws in SLOTS.values() for w in ws if w not in own and not names(sample["request"], w)}
        # One question, closing the reply (a bare "?" is none); only its own sentence may name the slot,
        # so an answer that assumes the slot ("Set for 7 o'clock. OK?") earns no slot credit.
        one_question = text.count("?") == 1 and text.endswith("?") and 2 <= words and short
        question = re.split(r"[.!]\s+|\n", text)[-1]
        named = one_question and any(names(question, w) for w in own) and not any(names(text, w) for w in others)
        reward = one_question * (1.0 + named)
    return {"reward": float(reward), "asked": float(asked), "named": float(named)}


def make_reward(cfg):  # rules need no settings; a judge-backed fork would read its own from cfg
    return lambda samples, responses: [score(s, r) for s, r in zip(samples, responses)]


def rollout_metrics(sample, score):
    ambiguous = "missing" in sample
    return {"reward": score["reward"], "decision_accuracy": float(score["asked"] == ambiguous),
            "asked_ambiguous": score["asked"] if ambiguous else None, "slot": score["named"] if ambiguous else None,
            "asked_clear": None if ambiguous else score["asked"], "answer": None if ambiguous else score["named"]}
