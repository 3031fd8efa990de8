"""The Learn-to-Ask reward (DESIGN.md §3): grade a policy response against the expert's observed future.

Three scores per response:
  R_s (action)  1 if the stop/continue decision matches decision_truth, else 0
  R_a (content) for a correct continue: does the question ask about something the expert went on to ask?
                for a correct stop: 1
  P   (format)  for a correct continue: 1.0 for one question, 0.5 for two, 0.0 for none or three+
                for a correct stop: 1.0 only if the response is exactly "<stop />"
A wrong decision scores 0 everywhere and costs no grading call. Only a correct continue needs a
backend to grade it; the backend is the seam where an LLM judge plugs in: an object whose
grade(sample, response) returns {"format", "content", "reasoning"}, or None when it could not grade.
"""

import re
from typing import Callable

STOP = "<stop />"


def fuse(rs: float, ra: float, p: float, mode: str) -> float:
    """Combine action, content and format scores into one scalar reward."""
    if mode == "multiplicative":  # the paper's default: content only counts when the decision is right; 0..4
        return rs * (1 + 2 * ra) + p
    if mode == "sum":
        return rs + ra + p
    if mode == "ra_only":  # ablations: keep one of the two signals, plus the format point
        return 2 * ra + p
    if mode == "rs_only":
        return 3 * rs + p
    raise ValueError(f"unknown judge fusion {mode!r}; expected multiplicative, sum, ra_only or rs_only")


# ----------------------------------------------------------------------------- offline backend

STOPWORDS = set("""a about an and any are as at be been but by can could did do does doing for from had
has have how i if in is it its like me my of on or so that the there this to was were what when where which
who why will with would you your feel feeling felt""".split())

# Words that show a question is about a field even when it names none of the expert's values,
# e.g. "Where does it hurt?" asks the location. The bare "symptom" field has no cue on purpose:
# "Any other symptoms?" is the textbook generic question.
FIELD_CUES = {
    "location": {"where", "location", "located", "area", "part"},
    "severity": {"severe", "severity", "bad", "scale", "intense", "serious"},
    "nature": {"kind", "type", "nature", "describe"},
    "trigger": {"trigger", "triggers", "triggered", "worse", "worsen", "better", "cause", "caused"},
}

FORMAT_BY_QUESTIONS = {1: 1.0, 2: 0.5}  # anything else, none included, earns 0


def questions(text: str) -> list[str]:
    """Sentences that end in a question mark (ASCII or full-width); '??' counts once."""
    return re.findall(r"[^.!?。！？\n]*[?？]+", text)


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def stems(text: str) -> set[str]:
    # Five letters is a crude stem that still tells words apart: cough/coughing, severe/severity match.
    return {w[:5] for w in words(text) - STOPWORDS}


def matches(question: str, item: str) -> set[str]:
    """The words by which a question asks about one info_truth item "field: value" (empty: it does not)."""
    field, _, value = item.rpartition(":")
    cues = FIELD_CUES.get(field.rsplit(" ", 1)[-1], set())  # "symptom location" -> "location"
    return (stems(question) & stems(value)) | (words(question) & cues)


class RulesJudge:
    """Deterministic, offline stand-in for the LLM judge, for tests and CPU smoke runs.

    Format: count the sentences ending in '?' or '？'.
    Content: 1.0 if some question shares a content word (stopwords dropped, compared on the first
    five letters, case-insensitive) with the value of an info_truth item "field: value", or holds a
    cue word of its field (location: where..., severity: how bad..., trigger: what makes it worse...);
    0.1 (generic) for a question that matches no item; 0.0 when there is no question at all.
    It never detects "irrelevant" or "ambiguous"; an LLM judge is needed for that.
    """

    def grade(self, sample: dict, response: str) -> dict:
        items = sample["info_truth"]
        if isinstance(items, str):  # iterating a string would silently grade single characters
            raise TypeError(f"info_truth must be a list of 'field: value' strings, got {items!r}")
        qs = questions(response)
        fmt = FORMAT_BY_QUESTIONS.get(len(qs), 0.0)
        if not qs:
            return {"format": fmt, "content": 0.0, "reasoning": "no question"}
        for q in qs:
            for item in items:
                hits = matches(q, item)
                if hits:
                    return {"format": fmt, "content": 1.0,
                            "reasoning": f"{len(qs)} question(s); asks about {item!r} via {sorted(hits)}"}
        return {"format": fmt, "content": 0.1,
                "reasoning": f"{len(qs)} question(s); generic, matches no info_truth item"}


def make_backend(cfg: dict):
    name = cfg.get("backend", "rules")
    if name == "rules":
        return RulesJudge()
    raise ValueError(f"unknown judge backend {name!r}; expected 'rules'")


# ----------------------------------------------------------------------------- reward

def score(sample: dict, response: str, backend, fusion: str) -> dict:
    """Grade one response. reward is None when the backend could not grade: missing, never a silent 0."""
    decision = "stop" if STOP in response else "continue"
    truth = sample["decision_truth"]
    if decision != truth:
        return {"reward": 0.0, "action": 0.0, "content": 0.0, "format": 0.0, "decision": decision,
                "reasoning": f"wrong decision: {decision}, expert chose {truth}"}
    if decision == "stop":
        exact = response.strip() == STOP
        graded = {"content": 1.0, "format": 1.0 if exact else 0.0,
                  "reasoning": "correct stop" + ("" if exact else ", but with text besides <stop />")}
    else:
        graded = backend.grade(sample, response)
        if graded is None:
            return {"reward": None, "action": 1.0, "content": None, "format": None, "decision": decision,
                    "reasoning": "judge failed"}
    reward = fuse(1.0, graded["content"], graded["format"], fusion)
    return {"reward": reward, "action": 1.0, **graded, "decision": decision}


def make_reward_fn(cfg: dict) -> Callable[[list[dict], list[str]], list[dict]]:
    """cfg is config.toml's [judge] section. The returned function grades a batch of (sample, response)."""
    backend = make_backend(cfg)
    fusion = cfg.get("fusion", "multiplicative")
    fuse(0.0, 0.0, 0.0, fusion)  # a typo in the config fails now, not after the first rollout

    def reward_fn(samples: list[dict], responses: list[str]) -> list[dict]:
        return [score(s, r, backend, fusion) for s, r in zip(samples, responses, strict=True)]

    return reward_fn
