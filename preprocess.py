"""
The task's data: consultation logs -> Learn-to-Ask samples, and the prompt the policy sees.

A raw session is a list of chat messages, "user" = patient, "assistant" = pharmacist. A processed
sample is one JSON line:

    {"cid": "206_1", "session_id": 206, "diagn": "Common cold",
     "messages": [...context...], "decision_truth": "continue",
     "info_truth": ["symptom: cough", "symptom nature: dry"]}

The labels come from what the real pharmacist did next (the "future"), never from a model's opinion.
"""

import json
import re

ROLES = ("user", "assistant")
DECISIONS = ("stop", "continue")
FIELDS = ("cid", "session_id", "diagn", "messages", "decision_truth", "info_truth")

SYSTEM_PROMPT = (
    "You are a pharmacist answering a patient in an online pharmacy chat. Read the conversation so "
    "far and decide what to do next. If you still need to know something before you can suggest a "
    "medicine, ask the one question that would help most: keep it short and offer 2-3 possible "
    "answers the patient can pick from. Ask only one question. If you already know enough to "
    "recommend a medicine, reply with exactly <stop /> and nothing else."
)

# -----------------------------------------------------------------------------
# splitting a session into samples


def split_session(messages):
    """
    Cut a session into (context, future) pairs, one per moment the pharmacist speaks right after a
    block of patient messages. The context is everything said so far (cumulative, so the policy
    sees the whole consultation, not just the last block); the future is everything after it.

    A context therefore always ends with a patient message. Consecutive pharmacist turns give one
    sample, before the first of them. A session that ends with patient messages and no pharmacist
    reply gives no sample for that last block: the log shows no expert action there (the chat was
    abandoned or cut off), so "stop" would be a label the pharmacist never chose.
    """
    return [
        (messages[:i], messages[i:])
        for i in range(1, len(messages))
        if messages[i]["role"] == "assistant" and messages[i - 1]["role"] == "user"
    ]


def decision_truth(future):
    """'stop' if the patient never speaks again, i.e. the pharmacist asked nothing more."""
    return "continue" if any(m["role"] == "user" for m in future) else "stop"


# -----------------------------------------------------------------------------
# reading processed samples

# The published data stores info_truth as one string, "field: value, field: value". Values may
# contain commas themselves ("symptom: cough, fever"), so split only at a comma that is followed
# by a new "field:" (a run of text with no comma or colon, then a colon).
_ITEM_START = re.compile(r",\s*(?=[^,:]+:)")


def split_info(info):
    """'a: x, b: y' -> ['a: x', 'b: y']; a list is returned as is (stripped)."""
    items = _ITEM_START.split(info) if isinstance(info, str) else info
    return [s.strip() for s in items if s.strip()]


def _check_sample(d):
    """Raise ValueError describing the first thing wrong with a decoded sample."""
    if not isinstance(d, dict):
        raise ValueError("a sample must be a JSON object")
    missing = [f for f in FIELDS if f not in d]
    if missing:
        raise ValueError(f"missing fields {missing}")
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {j}: role must be one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {j}: content must be a string")
    if msgs[-1]["role"] != "user":
        raise ValueError("the context must end with a patient (user) message")
    if d["decision_truth"] not in DECISIONS:
        raise ValueError(f"decision_truth must be one of {DECISIONS}, got {d['decision_truth']!r}")
    info = d["info_truth"]
    if not isinstance(info, (str, list)) or any(not isinstance(s, str) for s in info):
        raise ValueError("info_truth must be a string or a list of strings")


def load_samples(path):
    """Read processed samples, one JSON object per line; info_truth is returned as a list."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                _check_sample(d)
            except ValueError as e:  # json.JSONDecodeError is a ValueError too
                raise ValueError(f"{path}:{lineno}: {e}") from None
            d["info_truth"] = split_info(d["info_truth"])
            samples.append(d)
    return samples


# -----------------------------------------------------------------------------
# the policy's prompt


def policy_messages(sample):
    """The chat the policy answers: our instructions, then the consultation so far."""
    return [{"role": "system", "content": SYSTEM_PROMPT}] + sample["messages"]
