"""preprocess.py end to end: raw sessions -> processed files, with info_truth extracted through the real
judge.JudgeClient from a loopback OpenAI-compatible server; resuming after a kill; failed extractions."""

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import preprocess
from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]


class Extractor(BaseHTTPRequestHandler):
    """Answers a chat completion with server.answer(transcript, attempt); may SIGKILL a process."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        transcript = body["messages"][1]["content"]
        with self.server.lock:
            self.server.requests.append(body)
            attempt = self.server.attempts[transcript] = self.server.attempts.get(transcript, 0) + 1
            if len(self.server.requests) == self.server.kill_at:
                os.kill(self.server.victim, signal.SIGKILL)  # dies while this request is in flight
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": self.server.answer(transcript, attempt)}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Extractor)
    srv.lock, srv.requests, srv.attempts, srv.kill_at, srv.victim = threading.Lock(), [], {}, None, None
    thread = threading.Thread(target=srv.serve_forever)
    thread.start()
    yield srv
    srv.shutdown()
    thread.join()
    srv.server_close()


def write_config(folder, srv, max_retries=2):
    path = folder / "config.toml"
    path.write_text(f'[judge]\nbase_url = "http://127.0.0.1:{srv.server_port}/v1"\nmodel = "extractor"\n'
                    f"max_retries = {max_retries}\nbackoff = 0.0\nconcurrency = 4\n")
    return path


def run(folder, srv, raw, out="out.jsonl", extra=(), max_retries=2):
    """preprocess.main in this process, writing into folder; returns the output's lines."""
    args = ["--config", str(write_config(folder, srv, max_retries)), "--input", str(raw),
            "--output", str(folder / out), *extra]
    preprocess.main(args)
    return (folder / out).read_text().splitlines()


def write_raw(path, sessions):
    path.write_text("".join(json.dumps(s) + "\n" for s in sessions))
    return path


# -----------------------------------------------------------------------------
# the real session 35310

S = "Pharmacist: "  # how the transcript sent for extraction names the speakers
REPLIES = {  # first line of the future -> the extraction server's successive replies
    S + "How long have the symptoms been present?":
        ['["symptom duration: about 2 days", "symptom: eye discharge", "symptom nature: thick yellow '
         'discharge", "symptom: no eye pain, itching or vision change"]'],
    S + "Is there any discharge?":  # fenced, as chat models like to: accepted
        ['```json\n["symptom: eye discharge", "symptom nature: thick yellow discharge"]\n```'],
    S + "Sure":  # prose, then an unknown field: both refused and asked again
        ["The pharmacist asks about the discharge.", '["allergies: none"]',
         '["symptom nature: thick yellow discharge", "symptom: no eye pain, itching or vision change"]'],
    S + "Is the discharge thick, thin, or stringy?":
        ['["symptom nature: thick yellow discharge", "symptom: no eye pain, itching or vision change"]'],
    S + "Does it affect your vision? Do you have eye pain? Itchy eyes? Foreign body sensation? Tears?":
        ['["symptom: no eye pain, itching or vision change"]'],
    S + "Okay": ["[]"],  # only medication history and allergies are asked after this point
}


def fixture_answer(transcript, attempt):
    return REPLIES[transcript.split("\n")[0]][attempt - 1]


# Written by hand from the file: (cid, messages in the context, decision_truth, info_truth), and the
# pharmacist's next turn (EXPERT_TURNS).
# 35310_6 is missing: its future asks only about medication history and allergies, so no info, dropped.
EXPECTED = [
    ("35310_1", 5, "continue", ["symptom duration: about 2 days", "symptom: eye discharge",
                                "symptom nature: thick yellow discharge",
                                "symptom: no eye pain, itching or vision change"]),
    ("35310_2", 8, "continue", ["symptom: eye discharge", "symptom nature: thick yellow discharge"]),
    ("35310_3", 11, "continue", ["symptom nature: thick yellow discharge",
                                 "symptom: no eye pain, itching or vision change"]),
    ("35310_4", 14, "continue", ["symptom nature: thick yellow discharge",
                                 "symptom: no eye pain, itching or vision change"]),
    ("35310_5", 18, "continue", ["symptom: no eye pain, itching or vision change"]),
    ("35310_7", 27, "stop", []),
]


EXPERT_TURNS = ["How long have the symptoms been present?", "Is there any discharge?",
                "Sure\nThe internet was down just now", "Is the discharge thick, thin, or stringy?",
                "Does it affect your vision? Do you have eye pain? Itchy eyes? Foreign body sensation? Tears?",
                "<stop />"]


def test_real_session_end_to_end(tmp_path, server, capsys):
    server.answer = fixture_answer
    raw = FIXTURES / "realmedconv_35310.jsonl"
    msgs = json.loads(raw.read_text())["messages"]
    lines = run(tmp_path, server, raw)
    samples = [json.loads(line) for line in lines]
    turns = [s.pop("expert_turn") for s in samples]
    assert samples == [
        {"cid": cid, "session_id": 35310, "diagn": "Upper Respiratory Tract Infection", "messages": msgs[:n],
         "decision_truth": decision, "info_truth": info} for cid, n, decision, info in EXPECTED]
    assert turns == EXPERT_TURNS
    assert list(json.loads(lines[0])) == [*preprocess.FIELDS, "expert_turn"]  # the documented field order
    assert preprocess.load_samples(tmp_path / "out.jsonl")  # l2a reads it

    # One request per continue sample (six), none for the stop; two retries for the "Sure" future.
    assert len(server.attempts) == 6 and len(server.requests) == 8
    assert all(r["model"] == "extractor" and r["messages"][0] == {
        "role": "system", "content": preprocess.EXTRACTION_PROMPT} for r in server.requests)
    assert ("Pharmacist: Okay\n"  # the transcript of 35310_6's future, by hand
            "Pharmacist: Have you had any medical examinations or medication history? "
            "Any history of drug allergies or chronic diseases?\n"
            "Patient: No\n"
            "Patient: Please help as soon as possible, it's getting late\n"
            "Pharmacist: <med_search>") in server.attempts
    out = capsys.readouterr().out
    assert "samples: 7 (1 stop, 6 continue)" in out
    assert "6 requested (2 retries), 0 failed" in out
    assert "dropped: 1 " in out

    # A rerun finds every extraction in the journal: no request, the same file.
    before = (tmp_path / "out.jsonl").read_bytes()
    assert run(tmp_path, server, raw) == lines and len(server.requests) == 8
    assert (tmp_path / "out.jsonl").read_bytes() == before


# -----------------------------------------------------------------------------
# synthetic sessions


def session(sid, pattern):
    """A session with roles by letter: u patient, a pharmacist; e and E the same with empty text."""
    role = {"u": "user", "a": "assistant", "e": "user", "E": "assistant"}
    return {"session_id": sid, "diagn": "Cold", "messages": [
        {"role": role[c], "content": "" if c in "eE" else f"{sid} says {i}"} for i, c in enumerate(pattern)]}


def echo_answer(transcript, attempt):
    """One item naming the future's second message."""
    second = transcript.split("\n")[1].split(": ", 1)[1]
    return json.dumps([f"symptom: {second}"])


def test_edge_sessions(tmp_path, server):
    server.answer = echo_answer
    raw = write_raw(tmp_path / "raw.jsonl", [
        session(1, "uuu"),    # patient only: the pharmacist never acted, no sample
        session(2, "aaa"),    # pharmacist only: no patient block, no sample
        session(3, "uaaua"),  # two pharmacist turns in a row: one decision point, before them
        session(4, "uauu"),   # the patient has the last word: no sample for that last block
        session(5, "ueaua"),  # an empty patient message says nothing: left out of the context
        session(6, "uEua"),   # an empty pharmacist turn is no decision: one patient block, one sample
    ])
    got = [json.loads(line) for line in run(tmp_path, server, raw)]
    assert [(s["cid"], [m["content"] for m in s["messages"]], s["decision_truth"], s["info_truth"])
            for s in got] == [
        ("3_1", ["3 says 0"], "continue", ["symptom: 3 says 2"]),
        ("3_2", ["3 says 0", "3 says 1", "3 says 2", "3 says 3"], "stop", []),
        ("4_1", ["4 says 0"], "continue", ["symptom: 4 says 2"]),
        ("5_1", ["5 says 0"], "continue", ["symptom: 5 says 3"]),
        ("5_2", ["5 says 0", "5 says 2", "5 says 3"], "stop", []),
        ("6_1", ["6 says 0", "6 says 2"], "stop", []),
    ]


def test_sessions_split_whole_into_train_and_test(tmp_path, server):
    server.answer = echo_answer
    sessions = [session(sid, "uaua") for sid in range(20)]
    split = ["--test-output", str(tmp_path / "test.jsonl"), "--test-fraction", "0.25"]
    train = [json.loads(line) for line in run(tmp_path, server, write_raw(tmp_path / "raw.jsonl", sessions),
                                              extra=split)]
    test = preprocess.load_samples(tmp_path / "test.jsonl")
    train_ids, test_ids = {s["session_id"] for s in train}, {s["session_id"] for s in test}
    assert len(test_ids) == 5 and train_ids | test_ids == set(range(20)) and not train_ids & test_ids
    assert [s["cid"] for s in train] == [f"{sid}_{n}" for sid in sorted(train_ids) for n in (1, 2)]

    # The same sessions in another order: the same ones held out, each file in the new input order.
    raw = write_raw(tmp_path / "reversed.jsonl", sessions[::-1])
    train = [json.loads(line) for line in run(tmp_path, server, raw, "reversed_out.jsonl", extra=split)]
    test = preprocess.load_samples(tmp_path / "test.jsonl")
    assert [s["cid"] for s in test] == [f"{sid}_{n}" for sid in sorted(test_ids, reverse=True) for n in (1, 2)]
    assert [s["cid"] for s in train] == [f"{sid}_{n}" for sid in sorted(train_ids, reverse=True) for n in (1, 2)]


# -----------------------------------------------------------------------------
# resuming


def test_killed_run_resumes_to_the_same_file(tmp_path, server):
    server.answer = echo_answer
    raw = write_raw(tmp_path / "raw.jsonl", [session(sid, "uauaua") for sid in range(40)])  # 80 extractions
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    run(whole, server, raw)
    assert len(server.requests) == 80 > preprocess.CHUNK

    # A real process, killed while its second chunk of extractions is in flight.
    server.requests.clear()
    server.kill_at = preprocess.CHUNK + 6
    cmd = [sys.executable, "preprocess.py", "--config", str(write_config(killed, server)),
           "--input", str(raw), "--output", str(killed / "out.jsonl")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server.victim = proc.pid
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    assert not (killed / "out.jsonl").exists()
    assert len((killed / "out.jsonl.extractions").read_text().splitlines()) == preprocess.CHUNK

    server.requests.clear()
    server.kill_at = None
    run(killed, server, raw)
    # Only what the killed run had not saved. A request the killed run left in flight may still land after
    # the clear above, a copy of one the resumed run makes: count distinct requests.
    assert len({json.dumps(r, sort_keys=True) for r in server.requests}) == 80 - preprocess.CHUNK
    assert (killed / "out.jsonl").read_bytes() == (whole / "out.jsonl").read_bytes()


def test_torn_journal_line_is_cut_and_asked_again(tmp_path, server):
    server.answer = echo_answer
    raw = write_raw(tmp_path / "raw.jsonl", [session(sid, "uaua") for sid in range(10)])
    lines = run(tmp_path, server, raw)
    journal = tmp_path / "out.jsonl.extractions"
    entries = journal.read_bytes().splitlines(keepends=True)
    assert len(entries) == 10
    journal.write_bytes(b"".join(entries[:3]) + entries[3][:20])  # killed while writing the fourth entry
    (tmp_path / "out.jsonl").unlink()

    server.requests.clear()
    assert run(tmp_path, server, raw) == lines
    assert len(server.requests) == 7
    assert sorted(journal.read_bytes().splitlines(keepends=True)) == sorted(entries)


@pytest.mark.filterwarnings("ignore:judge request failed")
def test_failed_extraction_is_left_out_then_retried(tmp_path, server):
    raw = write_raw(tmp_path / "raw.jsonl", [session(sid, "uaua") for sid in range(3)])
    server.answer = lambda transcript, attempt: "Sorry, I cannot do that." if "1 says" in transcript \
        else echo_answer(transcript, attempt)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, server, raw, max_retries=1)
    assert "1_1" in str(e.value) and "rerun" in str(e.value)
    assert server.attempts["Pharmacist: 1 says 1\nPatient: 1 says 2\nPharmacist: 1 says 3"] == 2
    assert [s["cid"] for s in preprocess.load_samples(tmp_path / "out.jsonl")] == [
        "0_1", "0_2", "1_2", "2_1", "2_2"]  # no label is made up for 1_1; its session's stop stays

    server.answer = echo_answer
    server.requests.clear()
    lines = run(tmp_path, server, raw)
    assert len(server.requests) == 1
    assert [json.loads(line)["cid"] for line in lines] == ["0_1", "0_2", "1_1", "1_2", "2_1", "2_2"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert run(fresh, server, raw) == lines


@pytest.mark.filterwarnings("ignore:judge request failed")
def test_stops_asking_when_a_whole_chunk_fails(tmp_path, server):
    server.answer = lambda transcript, attempt: "<html>502 Bad Gateway</html>"
    raw = write_raw(tmp_path / "raw.jsonl", [session(sid, "uaua") for sid in range(preprocess.CHUNK + 10)])
    with pytest.raises(SystemExit) as e:
        run(tmp_path, server, raw, max_retries=0)
    assert len(server.requests) == preprocess.CHUNK
    assert "every request of a chunk failed, 10 more not tried" in str(e.value)
    assert [s["cid"] for s in preprocess.load_samples(tmp_path / "out.jsonl")] == [
        f"{sid}_2" for sid in range(preprocess.CHUNK + 10)]  # the stops need no extraction


# -----------------------------------------------------------------------------
# bad input through the command line


def test_bad_session_stops_the_run_or_is_skipped(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text("")  # stop samples only: no extraction, no server
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps(session(1, "ua")) + "\n" + '{"session_id": 2, "diagn": "Cold"}\n'
                   + json.dumps(session(3, "uua")) + "\n")
    args = ["--config", str(config), "--input", str(raw), "--output", str(tmp_path / "out.jsonl")]
    with pytest.raises(SystemExit) as e:
        preprocess.main(args)
    assert str(e.value) == f"error: {raw}:2: missing fields ['messages'] (--skip-invalid skips such sessions)"
    assert not (tmp_path / "out.jsonl").exists()

    preprocess.main(args + ["--skip-invalid"])
    assert [s["cid"] for s in preprocess.load_samples(tmp_path / "out.jsonl")] == ["1_1", "3_1"]
    captured = capsys.readouterr()
    assert f"skipped {raw}:2: missing fields" in captured.err
    assert "sessions: 2 read, 1 invalid skipped" in captured.out


def test_config_and_arguments_are_checked(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("")
    args = ["--config", str(config), "--input", "raw.jsonl", "--output", "out.jsonl"]
    with pytest.raises(SystemExit) as e:
        preprocess.main(args + ["--set", "judge.base_ulr=http://127.0.0.1:1/v1"])
    assert "unknown config key judge.base_ulr" in str(e.value)
    with pytest.raises(SystemExit):  # argparse: a test file without its share, or a share out of range
        preprocess.main(args + ["--test-output", "test.jsonl"])
    with pytest.raises(SystemExit):
        preprocess.main(args + ["--test-output", "test.jsonl", "--test-fraction", "1.5"])
