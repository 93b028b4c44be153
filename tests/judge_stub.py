"""A local OpenAI-compatible judge server on 127.0.0.1 for the judge tests."""

import json
import time
from http.server import BaseHTTPRequestHandler


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that prefers the longer response. Behaviour is
    scripted per test through class attributes: fail the first N calls with 500, sleep, or answer
    in a `mode`: "garbage" (not JSON), "trickle" (one byte every 0.2 s), "null" (content null),
    "zebra" (a verdict that is neither A nor B)."""

    failures_left = 0
    delay = 0.0
    calls = 0
    mode = ""

    def do_POST(self):
        StubJudge.calls += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(StubJudge.delay)
        if StubJudge.failures_left > 0:
            StubJudge.failures_left -= 1
            self.send_response(500)
            self.end_headers()
            return
        text = body["messages"][-1]["content"]
        a = text.split("Response A:\n")[1].split("\n\nResponse B:")[0]
        b = text.split("Response B:\n")[1].split("\n\nWhich response")[0]
        verdict = {"null": None, "zebra": "Zebra"}.get(
            StubJudge.mode, "A" if len(a) >= len(b) else "B"
        )
        data = json.dumps({"choices": [{"message": {"content": verdict}}]}).encode()
        if StubJudge.mode == "garbage":
            data = b"<html>gateway says hello</html>"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if StubJudge.mode == "trickle":
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        self.wfile.write(data)

    def log_message(self, *args):
        pass
