"""
The task's data: consultation logs -> Learn-to-Ask samples, and the prompt the policy sees.

    python preprocess.py --config config.toml --input RAW.jsonl --output train.jsonl \
        [--test-output test.jsonl --test-fraction 0.2] [--skip-invalid] [--set judge.KEY=VALUE ...]

A raw session is one JSON line {"session_id", "diagn", "messages"}, the messages a chat in which
"user" = patient and "assistant" = pharmacist. A processed sample is one JSON line:

    {"cid": "206_1", "session_id": 206, "diagn": "Common cold",
     "messages": [...context...], "decision_truth": "continue",
     "info_truth": ["symptom: cough", "symptom nature: dry"], "expert_turn": "Is the cough dry?"}

The labels come from what the real pharmacist did next (the "future"), never from a model's opinion:
decision_truth from whether the patient speaks again, info_truth from what the pharmacist went on to
ask, which an LLM (the [judge] section's endpoint) only transcribes into "field: value" items.

Extractions are saved in OUTPUT.extractions as they arrive, a chunk at a time, so a run that is stopped
or killed is completed by running the same command again, which asks only for what is missing. The output files
are written whole at the end, in input order, so every run over the same input writes the same bytes.
"""

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

import judge
from config import load_config

ROLES = ("user", "assistant")
DECISIONS = ("stop", "continue")
FIELDS = ("cid", "session_id", "diagn", "messages", "decision_truth", "info_truth")  # required; expert_turn optional
SESSION_FIELDS = ("session_id", "diagn", "messages")

SYSTEM_PROMPT = (
    "You are a pharmacist chatting with a patient in an online pharmacy. Before you suggest a medicine "
    "you need to know the patient's symptoms: where it is, what it feels like, how bad it is, how long "
    "they have had it, what makes it worse, and what other symptoms they have. Ask the one short "
    "question that helps most now, about something the patient has not told you yet. If you already "
    "know enough to recommend a medicine, reply with exactly <stop /> and nothing else."
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


def expert_turn(future):
    """What the pharmacist did next, in the policy's terms: <stop /> where they asked nothing more, else
    their next message(s) verbatim, up to the patient's reply. The judge's ceiling: a perfect imitator."""
    if decision_truth(future) == "stop":
        return judge.STOP
    block = future[:next(i for i, m in enumerate(future) if m["role"] == "user")]
    return "\n".join(m["content"] for m in block)


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


def _check_fields(d, fields, what):
    if not isinstance(d, dict):
        raise ValueError(f"a {what} must be a JSON object")
    missing = [f for f in fields if f not in d]
    if missing:
        raise ValueError(f"missing fields {missing}")
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"message {j} must be a JSON object")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {j}: role must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {j}: content must be a string, got {type(m.get('content')).__name__}")


def _check_sample(d):
    """Raise ValueError describing the first thing wrong with a decoded sample."""
    _check_fields(d, FIELDS, "sample")
    msgs = d["messages"]
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
    recover_expert_turns(samples)
    return samples


def recover_expert_turns(samples):
    """Fill in expert_turn where a file written before the field lacks it: a stop is <stop />, and a
    continue's turn is read off a later sample of its session, whose context holds the pharmacist's
    reply (None where the file holds no such sample)."""
    sessions = {}
    for s in samples:
        sessions.setdefault(s["session_id"], []).append(s)
    for s in samples:
        if "expert_turn" in s:
            continue
        later = [t["messages"][len(s["messages"]):] for t in sessions[s["session_id"]]
                 if len(t["messages"]) > len(s["messages"])]
        s["expert_turn"] = judge.STOP if s["decision_truth"] == "stop" else \
            expert_turn(min(later, key=len)) if later else None


# -----------------------------------------------------------------------------
# the policy's prompt


def policy_messages(sample):
    """The chat the policy answers: our instructions, then the consultation so far."""
    return [{"role": "system", "content": SYSTEM_PROMPT}] + sample["messages"]


# -----------------------------------------------------------------------------
# reading raw sessions


def _check_session(d):
    """Raise ValueError describing the first thing wrong with a decoded raw session."""
    _check_fields(d, SESSION_FIELDS, "session")
    if type(d["session_id"]) not in (int, str):  # a cid is built from it; bool and float are typos
        raise ValueError(f"session_id must be an integer or a string, got {d['session_id']!r}")
    if not isinstance(d["diagn"], str):
        raise ValueError(f"diagn must be a string, got {type(d['diagn']).__name__}")


def read_sessions(path, skip_invalid=False):
    """
    Raw sessions in file order, and how many were skipped. A bad line raises ValueError naming
    path:line, or with skip_invalid is reported on stderr and counted. Two sessions with the same id
    would give the same cids, so the second one is bad too.
    """
    sessions, skipped, seen = [], 0, {}
    with open(path, "rb") as f:  # bytes: invalid UTF-8 then fails inside json.loads, with its line number
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                _check_session(d)
                if str(d["session_id"]) in seen:
                    raise ValueError(f"session_id {d['session_id']!r} already used on line "
                                     f"{seen[str(d['session_id'])]}")
            except ValueError as e:
                if not skip_invalid:
                    raise ValueError(f"{path}:{lineno}: {e} (--skip-invalid skips such sessions)") from None
                print(f"skipped {path}:{lineno}: {e}", file=sys.stderr)
                skipped += 1
                continue
            seen[str(d["session_id"])] = lineno
            sessions.append(d)
    return sessions, skipped


def session_samples(session):
    """The session's decision points as (sample, future) pairs; continue samples still lack info_truth."""
    # A message without text (a sticker or picture the export emptied) says nothing. Kept, an empty
    # pharmacist turn would count as a decision point, and an empty patient turn would end a context.
    msgs = [m for m in session["messages"] if m["content"].strip()]
    return [({"cid": f"{session['session_id']}_{n}", "session_id": session["session_id"],
              "diagn": session["diagn"], "messages": context, "decision_truth": decision_truth(future),
              "info_truth": [], "expert_turn": expert_turn(future)}, future)
            for n, (context, future) in enumerate(split_session(msgs), 1)]


# -----------------------------------------------------------------------------
# info_truth: what the pharmacist went on to ask, read off the future by an LLM

# The paper's fields, named as in the published data, plus "symptom duration": "how long?" is the
# pharmacist's commonest question, and the demo data keeps it as a field of its own too.
INFO_FIELDS = ("symptom", "symptom nature", "symptom location", "symptom severity", "symptom duration",
               "trigger")

EXTRACTION_PROMPT = """\
You will see the rest of a chat between a pharmacist and a patient at an online pharmacy. List the \
clinical details the pharmacist asks the patient about in it, with the patient's answers.

Use only these fields:
- symptom: a symptom the pharmacist asks whether the patient has
- symptom nature: what it is like (dry or chesty cough, sharp or dull pain, colour of phlegm)
- symptom location: where in the body it is
- symptom severity: how strong it is or how often it comes
- symptom duration: how long it has lasted
- trigger: what brought it on or makes it better or worse

Rules:
- Include a field only when the pharmacist asks about it here. Details the patient gives without \
being asked do not count.
- The value is what the patient answered, in a few plain clinical words ("thick yellow phlegm", \
"2 days", "no fever"). If the patient does not answer, name what was asked ("colour of phlegm").
- Leave out medication history, allergies, chronic or past illnesses, and everything outside the \
fields above: greetings, waiting, advice, the recommendation.

Reply with a JSON array of "field: value" strings and nothing else, for example
["symptom duration: 2 days", "symptom nature: thick yellow phlegm"]
Reply [] when the pharmacist asks about none of these fields."""


def extraction_request(future):
    """The chat sent to the extraction LLM for one sample: instructions, then the future as a transcript."""
    transcript = "\n".join(f"{judge.SPEAKERS[m['role']]}: {m['content']}" for m in future)
    return [{"role": "system", "content": EXTRACTION_PROMPT}, {"role": "user", "content": transcript}]


def parse_info(reply):
    """
    The extraction reply -> list of "field: value" items, or ValueError (the client then asks again).
    Strict: a JSON array of strings, each a known field and a non-empty value. The one thing forgiven
    is a ``` fence around the array, which chat models add even when told not to.
    """
    text = reply.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json")
    items = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"expected a JSON array of strings, got {reply!r}")
    info = []
    for item in items:
        field, colon, value = item.partition(":")
        field, value = field.strip().lower(), value.strip()
        if not colon or field not in INFO_FIELDS or not value:
            raise ValueError(f"{item!r} is not 'field: value' with a field among {INFO_FIELDS}")
        info.append(f"{field}: {value}")
    return info


# -----------------------------------------------------------------------------
# the pipeline: raw sessions -> train (and test) files, resumable

CHUNK = 64  # extractions saved to the journal together; a killed run loses at most this many calls


def request_key(model, request):
    """Journal entries are keyed by model and request, so a changed session, prompt or model is asked anew."""
    return hashlib.sha256(json.dumps([model, request], ensure_ascii=False).encode()).hexdigest()


def read_journal(path):
    """
    The extractions earlier runs saved, by request key. Every entry is written whole with its newline,
    so a kill can only tear the last line; it is cut off, so that the next append starts on a clean line.
    """
    if not os.path.exists(path):
        return {}
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    done = {}
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        try:
            entry = json.loads(line)
            done[entry["key"]] = entry["info_truth"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: not a saved extraction ({e}); delete the file to "
                             "extract everything again") from None
    return done


def write_atomic(path, samples):
    """Write the whole file under a temporary name, then rename: a reader sees the old file or the new."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pick_test_sessions(session_ids, fraction):
    """round(fraction * n) sessions, ranked by a hash of their id: the same ones whatever the file order."""
    ranked = sorted(session_ids, key=lambda s: hashlib.sha256(str(s).encode()).hexdigest())
    return set(ranked[:round(fraction * len(ranked))])


def process_logs(judge_cfg, input_path, output, test_output=None, test_fraction=0.0, skip_invalid=False):
    """
    Raw sessions -> processed samples in input order (session, then decision point), whole sessions
    held out to test_output. Extractions are appended to OUTPUT.extractions as they finish, so a
    rerun asks only for what is missing; the output files are written once at the end, atomically.
    Returns the counts of the run; "failed" lists the cids whose extraction failed (left out).
    """
    sessions, invalid = read_sessions(input_path, skip_invalid)
    pairs = [pair for session in sessions for pair in session_samples(session)]
    requests = {s["cid"]: extraction_request(future) for s, future in pairs if s["decision_truth"] == "continue"}
    keys = {cid: request_key(judge_cfg["model"], request) for cid, request in requests.items()}

    for path in (output, test_output):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    journal_path = f"{output}.extractions"
    done = read_journal(journal_path)
    todo = [cid for cid in requests if keys[cid] not in done]
    failed, retries, untried = [], 0, 0
    if todo:
        failed, retries, untried = extract_infos(judge_cfg, requests, keys, todo, done, journal_path)
    samples, dropped = labelled_samples(pairs, done, keys)

    held_out = set()
    if test_output:
        held_out = pick_test_sessions(list(dict.fromkeys(s["session_id"] for s, _ in pairs)), test_fraction)
        write_atomic(test_output, [s for s in samples if s["session_id"] in held_out])
    write_atomic(output, [s for s in samples if s["session_id"] not in held_out])
    stops = sum(s["decision_truth"] == "stop" for s, _ in pairs)
    return {"sessions": len(sessions), "invalid": invalid, "samples": len(pairs), "stop": stops,
            "continue": len(pairs) - stops, "reused": len(requests) - len(todo), "requested": len(todo),
            "retries": retries, "failed": failed, "untried": untried, "dropped": dropped, "journal": journal_path,
            "train": sum(s["session_id"] not in held_out for s in samples),
            "test": sum(s["session_id"] in held_out for s in samples)}


def extract_infos(judge_cfg, requests, keys, todo, done, journal_path):
    """Asks for the `todo` extractions, saving each in `done` and the journal: (failed cids, retries, untried)."""
    client = judge.JudgeClient(judge_cfg)
    failed, empty, untried = [], 0, 0
    bar = tqdm(total=len(todo), desc="extracting info_truth", unit="sample")
    with open(journal_path, "a", encoding="utf-8") as journal:
        for start in range(0, len(todo), CHUNK):
            cids = todo[start:start + CHUNK]
            infos = client.complete_many([requests[c] for c in cids], parse_info)
            for cid, info in zip(cids, infos):
                if info is None:
                    failed.append(cid)  # not saved: the next run asks again
                    continue
                done[keys[cid]] = info
                empty += not info
                journal.write(json.dumps({"cid": cid, "key": keys[cid], "info_truth": info},
                                         ensure_ascii=False) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
            bar.update(len(cids))
            bar.set_postfix(no_info=empty, failed=len(failed))
            if all(info is None for info in infos):  # a dead endpoint, or a model that never keeps to
                untried = len(todo) - start - len(cids)  # the format: stop rather than fail slowly
                break
    bar.close()
    return failed, client.drain_stats()["retries"], untried


def labelled_samples(pairs, done, keys):
    """(the samples with a label, in order, info_truth set on each "continue"; the count dropped for empty info)."""
    samples, dropped = [], 0
    for sample, _ in pairs:
        if sample["decision_truth"] == "continue":
            info = done.get(keys[sample["cid"]])
            if info is None:  # its extraction failed: left out, never written with a made-up label
                continue
            if not info:  # the pharmacist asked nothing we grade, so there is nothing to learn
                dropped += 1
                continue
            sample["info_truth"] = info
        samples.append(sample)
    return samples, dropped


def main(argv=None):
    parser = argparse.ArgumentParser(description="Raw consultation logs -> Learn-to-Ask samples.")
    parser.add_argument("--config", required=True, help="TOML file; its [judge] section is the extraction LLM")
    parser.add_argument("--input", required=True, help="raw sessions, one JSON object a line")
    parser.add_argument("--output", required=True, help="processed samples (the training file)")
    parser.add_argument("--test-output", help="processed samples of the held-out sessions")
    parser.add_argument("--test-fraction", type=float, help="share of sessions held out to --test-output")
    parser.add_argument("--skip-invalid", action="store_true", help="skip and count bad sessions instead of stopping")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable); the value is read as TOML")
    args = parser.parse_args(argv)
    if (args.test_output is None) != (args.test_fraction is None):
        parser.error("--test-output and --test-fraction go together")
    if args.test_fraction is not None and not 0 < args.test_fraction < 1:
        parser.error("--test-fraction must be between 0 and 1")

    try:
        cfg = load_config(args.config, args.set)
    except (ValueError, OSError) as e:  # tomllib.TOMLDecodeError is a ValueError
        sys.exit(f"config error: {e}")
    try:
        r = process_logs(cfg["judge"], args.input, args.output, args.test_output, args.test_fraction or 0.0,
                       args.skip_invalid)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

    print(f"sessions: {r['sessions']} read, {r['invalid']} invalid skipped")
    print(f"samples: {r['samples']} ({r['stop']} stop, {r['continue']} continue)")
    print(f"extraction: {r['reused']} reused from {r['journal']}, {r['requested']} requested "
          f"({r['retries']} retries), {len(r['failed'])} failed, {r['untried']} not tried")
    print(f"dropped: {r['dropped']} continue samples with no info to ask about")
    print(f"wrote {r['train']} samples to {args.output}"
          + (f", {r['test']} to {args.test_output}" if args.test_output else ""))
    if r["failed"]:
        sys.exit(f"extraction failed for {', '.join(r['failed'])}"
                 + (f", then stopped: every request of a chunk failed, {r['untried']} more not tried"
                    if r["untried"] else "")
                 + ". These samples are left out; rerun the same command to retry them.")


if __name__ == "__main__":
    main()
