"""A fake OpenAI-compatible judge on loopback, for tests: it grades like a (very simple) judge and can be
told to fail its next requests in chosen ways.

Its grade: format 1; content 1 if the graded reply contains "where", else 0.1. A request that is not a
grading request gets its last message echoed back.
"""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "503", "429", "401", "slow", "not json", "no choices", "no scores", "out of range")


def grade_reply(content):
    graded = re.search(r"<reply>\n(.*)\n</reply>", content, re.S)
    if not graded:
        return content
    score = 1 if "where" in graded.group(1).lower() else 0.1
    return f"The trainee asks: {graded.group(1)}\n<format_score>1</format_score>\n" \
           f"<content_score>{score}</content_score>"


class FaultyJudge:
    """with FaultyJudge() as judge: judge.url is the API root; judge.fail_next(...) injects faults."""

    def __init__(self, port=0, gate=0):
        self.faults = []  # the fates of the coming requests, in order; when empty, requests are answered well
        self.requests = []  # (headers, body) of every request received
        self.arrivals = []  # time.monotonic() of every request received
        self.gate = gate  # > 0: hold the first `gate` requests until that many are in flight (see handle)
        self.in_flight = self.max_in_flight = 0
        self.changed = threading.Condition()
        self.closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self.handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.closing.set()  # frees the handlers of "slow" requests
        self.server.shutdown()
        self.server.server_close()

    def fail_next(self, *faults):
        assert set(faults) <= set(FAULTS), f"unknown fault in {faults}; known: {FAULTS}"
        with self.changed:
            self.faults += faults

    def handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.changed:
                    judge.requests.append((dict(self.headers), body))
                    judge.arrivals.append(time.monotonic())
                    fault = judge.faults.pop(0) if judge.faults else None
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                    judge.changed.notify_all()
                    if len(judge.requests) <= judge.gate:
                        # The first `gate` requests wait for each other, so a client allowed that many at
                        # once shows it; then a little longer, so one allowed more would send one more.
                        judge.changed.wait_for(lambda: len(judge.requests) >= judge.gate, timeout=10)
                        judge.changed.wait_for(lambda: len(judge.requests) > judge.gate, timeout=0.3)
                try:
                    self.answer(fault, body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
                    pass
                with judge.changed:
                    judge.in_flight -= 1

            def answer(self, fault, body):
                text = grade_reply(body["messages"][-1]["content"])
                if fault == "slow":  # answered only after the client's timeout, and with another grade
                    judge.closing.wait(5)
                    text = "Too late.\n<format_score>0</format_score>\n<content_score>0</content_score>"
                if fault in ("500", "503", "429"):
                    headers = {"Retry-After": "1"} if fault == "429" else {}
                    return self.send(int(fault), b"overloaded", headers)
                if fault == "401":  # like a careless proxy that echoes the request's credentials
                    return self.send(401, f"bad key in {self.headers['Authorization']}".encode())
                if fault == "not json":
                    return self.send(200, b"<html>gateway error</html>")
                if fault == "no choices":
                    return self.send(200, json.dumps({"choices": []}).encode())
                if fault == "no scores":
                    text = "Looks like a fine question to me."
                if fault == "out of range":
                    text = "Good.\n<format_score>1</format_score>\n<content_score>0.7</content_score>"
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                self.send(200, json.dumps(reply).encode())

            def send(self, status, payload, headers=None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep the test output quiet
                pass

        return Handler
