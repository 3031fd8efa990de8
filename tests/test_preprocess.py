"""How consultation logs become samples, checked on a real RealMedConv session and on edge cases."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import FIXTURES
from preprocess import (INFO_FIELDS, SYSTEM_PROMPT, decision_truth, load_samples, parse_info,
                        pick_test_sessions, policy_messages, read_sessions, session_samples, split_info,
                        split_session)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"


def roles(s):
    """'uaau' -> messages with those roles (u = patient, a = pharmacist), content = position."""
    return [{"role": {"u": "user", "a": "assistant"}[c], "content": str(i)} for i, c in enumerate(s)]


def cut(s):
    """Each sample as (index of its last context message, decision_truth)."""
    return [(len(ctx) - 1, decision_truth(fut)) for ctx, fut in split_session(roles(s))]


# -----------------------------------------------------------------------------
# split_session / decision_truth on the real session 35310

# Its 28 roles, read off the file: 5 patient messages, then the pharmacist asks how long, and so on;
# the pharmacist's last turn is the <med_search> action at index 27.
REAL_ROLES = "uuuuu" "a" "uu" "a" "uu" "aa" "u" "a" "uuu" "a" "uuuu" "aa" "uu" "a"

# Written by hand: the pharmacist speaks right after a patient block at indices 5, 8, 11, 14, 18, 23,
# 27, so the contexts end one earlier. The patient speaks again after every one of them except the
# last, where only <med_search> follows: that one is the single stop.
REAL_EXPECTED = [(4, "continue"), (7, "continue"), (10, "continue"), (13, "continue"),
                 (17, "continue"), (22, "continue"), (26, "stop")]


def test_real_session_samples():
    session = json.loads((FIXTURES / "realmedconv_35310.jsonl").read_text())
    msgs = session["messages"]
    assert "".join(m["role"][0] for m in msgs) == REAL_ROLES
    pairs = split_session(msgs)
    assert [(len(c) - 1, decision_truth(f)) for c, f in pairs] == REAL_EXPECTED
    assert pairs[0][1][0]["content"] == "How long have the symptoms been present?"
    assert pairs[-1][1] == [{"role": "assistant", "content": "<med_search>"}]
    for context, future in pairs:
        assert context + future == msgs  # nothing lost, nothing repeated
        assert context[-1]["role"] == "user"
        assert future[0]["role"] == "assistant"
    for (a, _), (b, _) in zip(pairs, pairs[1:]):
        assert b[:len(a)] == a and len(b) > len(a)  # cumulative: each context extends the one before


def test_real_session_roles_cut_without_the_file():
    # Same expectation on the role pattern alone, so it is checked even where the file is absent.
    assert cut(REAL_ROLES) == REAL_EXPECTED


# -----------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("pattern, expected", [
    ("", []),                                          # empty session
    ("uuu", []),                                       # patient only: the pharmacist never acted
    ("aaa", []),                                       # pharmacist only: no patient block
    ("ua", [(0, "stop")]),
    ("au" "a", [(1, "stop")]),                         # a greeting first stays in the context
    ("ua" "a" "u" "a", [(0, "continue"), (3, "stop")]),  # two pharmacist turns: one decision
    ("ua" "uu", [(0, "continue")]),                    # trailing patient block: no sample (see docstring)
    ("uau" "aa" "u", [(0, "continue"), (2, "continue")]),  # patient has the last word
])
def test_split_edge_cases(pattern, expected):
    assert cut(pattern) == expected


def test_decision_truth():
    assert decision_truth([]) == "stop"
    assert decision_truth(roles("aa")) == "stop"
    assert decision_truth(roles("u")) == "continue"
    assert decision_truth(roles("aua")) == "continue"


# -----------------------------------------------------------------------------
# load_samples


def test_load_real_processed_sample():
    [s] = load_samples(FIXTURES / "realmedconv_206_1_processed.jsonl")
    assert (s["cid"], s["session_id"], s["decision_truth"]) == ("206_1", 206, "continue")
    assert [m["role"] for m in s["messages"]] == ["assistant", "user"]
    # The published comma-joined string, split by hand into its items.
    assert s["info_truth"] == ["symptom: needle-like sensation", "symptom location: ear",
                               "symptom nature: sharp pain", "symptom severity: occurred twice"]


def test_split_info_keeps_commas_inside_values():
    assert split_info("symptom: cough, fever, trigger: cold air") == [
        "symptom: cough, fever", "trigger: cold air"]
    assert split_info("symptom nature: dry") == ["symptom nature: dry"]
    assert split_info("") == []
    assert split_info(["symptom: cough", "trigger: dust"]) == ["symptom: cough", "trigger: dust"]


GOOD = {"cid": "1_1", "session_id": 1, "diagn": "Common cold",
        "messages": [{"role": "user", "content": "I have a cold."}],
        "decision_truth": "continue", "info_truth": ["symptom: fever"]}


def changed(base, **changes):
    """A JSON line of base with some fields replaced (a value of None removes the field)."""
    return json.dumps({k: v for k, v in {**base, **changes}.items() if v is not None})


def broken(**changes):
    return changed(GOOD, **changes)


@pytest.mark.parametrize("line, why", [
    ('{"cid": "1_1",', "Expecting"),
    ("[1, 2]", "JSON object"),
    (broken(info_truth=None), "missing fields ['info_truth']"),
    (broken(messages=[]), "non-empty list"),
    (broken(messages=[{"role": "doctor", "content": "hi"}]), "role"),
    (broken(messages=[{"role": "user", "content": ["hi"]}]), "content must be a string"),
    (broken(messages=[{"role": "user"}]), "content must be a string"),
    (broken(messages=GOOD["messages"] + [{"role": "assistant", "content": "ok"}]), "must end with a patient"),
    (broken(decision_truth="maybe"), "decision_truth"),
    (broken(info_truth=[1]), "info_truth"),
])
def test_load_errors_name_file_and_line(tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        load_samples(path)
    assert f"{path}:2:" in str(e.value)
    assert why in str(e.value)


def test_load_skips_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n")
    assert load_samples(path) == [{**GOOD, "expert_turn": None}]  # a lone continue: no later turn to read


# -----------------------------------------------------------------------------
# the demo dataset


def test_demo_files():
    train, test = load_samples(DEMO / "train.jsonl"), load_samples(DEMO / "test.jsonl")
    assert len(train) >= 200 and len(test) >= 50
    assert not {s["session_id"] for s in train} & {s["session_id"] for s in test}
    for split in (train, test):
        stop_share = sum(s["decision_truth"] == "stop" for s in split) / len(split)
        assert 0.25 <= stop_share <= 0.35
        for s in split:
            assert s["cid"].startswith(f"{s['session_id']}_")
            # continue samples carry what to ask about; a stop has nothing left to ask
            assert bool(s["info_truth"]) == (s["decision_truth"] == "continue")
            assert all(": " in item for item in s["info_truth"])


def test_demo_files_match_generator():
    # The committed files are exactly what make_demo.py writes, so its README numbers can be rebuilt.
    spec = importlib.util.spec_from_file_location("make_demo", DEMO / "make_demo.py")
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    built = make_demo.build()
    assert load_samples(DEMO / "train.jsonl") == built["train"]
    assert load_samples(DEMO / "test.jsonl") == built["test"]


# -----------------------------------------------------------------------------
# the policy prompt


def test_policy_messages():
    sample = {**GOOD, "messages": roles("aua")[:2]}
    msgs = policy_messages(sample)
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert msgs[1:] == sample["messages"]
    assert len(sample["messages"]) == 2  # the sample itself is left untouched
    assert "<stop />" in SYSTEM_PROMPT


# -----------------------------------------------------------------------------
# raw sessions


RAW = {"session_id": 7, "diagn": "Cold", "messages": [{"role": "user", "content": "I have a cold."},
                                                       {"role": "assistant", "content": "Since when?"}]}


def raw_line(**changes):
    return changed(RAW, **changes)


@pytest.mark.parametrize("line, why", [
    ('{"session_id": 8,', "Expecting"),
    ("[1, 2]", "JSON object"),
    (raw_line(diagn=None), "missing fields ['diagn']"),
    (raw_line(messages=[]), "non-empty list"),
    (raw_line(messages="hello"), "non-empty list"),
    (raw_line(messages=["hello"]), "message 0 must be a JSON object"),
    (raw_line(messages=[{"role": "doctor", "content": "hi"}]), "got 'doctor'"),
    (raw_line(messages=[{"content": "hi"}]), "got None"),
    (raw_line(messages=[{"role": "user", "content": ["hi"]}]), "content must be a string, got list"),
    (raw_line(messages=[{"role": "user", "content": None}]), "content must be a string"),
    (raw_line(session_id=True), "session_id must be an integer or a string"),
    (raw_line(session_id=1.5), "session_id must be an integer or a string"),
    (raw_line(diagn=3), "diagn must be a string"),
    (raw_line(session_id="7"), "session_id '7' already used on line 1"),  # same cids as session 7
])
def test_bad_sessions_name_file_and_line(tmp_path, line, why):
    path = tmp_path / "raw.jsonl"
    path.write_text(raw_line() + "\n\n" + line + "\n" + raw_line(session_id=9) + "\n")
    with pytest.raises(ValueError) as e:
        read_sessions(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert why in str(e.value)
    sessions, skipped = read_sessions(path, skip_invalid=True)
    assert [s["session_id"] for s in sessions] == [7, 9] and skipped == 1


def test_bad_utf8_names_its_line(tmp_path):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(raw_line().encode() + b"\n" + b'{"session_id": 8, "diagn": "\xff"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: "):
        read_sessions(path)


def test_session_samples_number_decision_points():
    session = {**RAW, "messages": roles("uauaua")}
    samples = [s for s, _ in session_samples(session)]
    assert [(s["cid"], len(s["messages"]), s["decision_truth"]) for s in samples] == [
        ("7_1", 1, "continue"), ("7_2", 3, "continue"), ("7_3", 5, "stop")]
    assert all(s["info_truth"] == [] for s in samples)  # filled in by the extraction


# -----------------------------------------------------------------------------
# the extraction reply


@pytest.mark.parametrize("reply, info", [
    ('["symptom: dry cough", "symptom duration: 3 days"]', ["symptom: dry cough", "symptom duration: 3 days"]),
    ("[]", []),
    (' ```json\n["Trigger :  cold air"]\n```\n', ["trigger: cold air"]),  # fence, case and spaces tidied
    ('["symptom: cough: worse at night"]', ["symptom: cough: worse at night"]),  # a colon in the value
])
def test_parse_info_accepts(reply, info):
    assert parse_info(reply) == info


@pytest.mark.parametrize("reply", [
    "symptom: dry cough",                 # not JSON
    'Here it is: ["symptom: cough"]',     # prose around the JSON
    '{"symptom": "cough"}',               # an object, not a list
    '"symptom: cough"',                   # a string, not a list
    '[["symptom: cough"]]',               # a list of lists
    '["symptom cough"]',                  # no colon
    '["symptom: "]',                      # no value
    '["allergies: none"]',                # a field we do not grade
    '["medication history: ibuprofen"]',
])
def test_parse_info_refuses(reply):
    with pytest.raises(ValueError):
        parse_info(reply)


def test_info_fields_are_the_ones_the_judge_knows():
    # Extracted and demo labels use one vocabulary, so training and grading see the same field names.
    demo = {item.split(":")[0] for s in load_samples(DEMO / "train.jsonl") for item in s["info_truth"]}
    assert demo == set(INFO_FIELDS)


# -----------------------------------------------------------------------------
# the train / test split


def test_pick_test_sessions():
    ids = list(range(100))
    held_out = pick_test_sessions(ids, 0.2)
    assert len(held_out) == 20 and held_out <= set(ids)
    assert pick_test_sessions(ids[::-1], 0.2) == held_out  # the file order does not matter
    assert pick_test_sessions([1, 2, 3], 0.1) == set()


def test_each_sample_holds_the_experts_next_turn_and_older_files_recover_it(tmp_path):
    turns = [("user", "I have a cough."), ("assistant", "I see."), ("assistant", "Since when?"),
             ("user", "Two days."), ("assistant", "Is it dry?"), ("user", "Yes."), ("assistant", "Take this.")]
    session = {"session_id": 7, "diagn": "Cough", "messages": [{"role": r, "content": c} for r, c in turns]}
    samples = [s for s, _ in session_samples(session)]
    assert [(s["decision_truth"], s["expert_turn"]) for s in samples] == [
        ("continue", "I see.\nSince when?"), ("continue", "Is it dry?"), ("stop", "<stop />")]
    # a file written before the field: each turn is read off the next sample of the session
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in s.items() if k != "expert_turn"}) + "\n" for s in samples))
    assert [s["expert_turn"] for s in load_samples(old)] == [s["expert_turn"] for s in samples]
    # the last continue sample of a session cut short has no later sample to read its turn from
    old.write_text(json.dumps({k: v for k, v in samples[0].items() if k != "expert_turn"}) + "\n")
    assert load_samples(old)[0]["expert_turn"] is None


def test_the_task_modules_import_neither_the_trainer_nor_torch():
    """config.py is the one home of the config: preprocess and judge read it without an import circle."""
    import subprocess
    import sys
    probe = "import sys, preprocess, judge; print(sorted(m for m in ('torch', 'l2a') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
