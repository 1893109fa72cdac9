"""Host-side unit tests of snowflock.py against a fake agent socket.

Run: python3 guest-agent/python/test_snowflock.py
"""

import json
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import snowflock  # noqa: E402


class FakeAgent:
    """Answers each connection with the next scripted answer (bytes or dict)."""

    def __init__(self, path, answers):
        self.requests = []
        self.answers = list(answers)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        for answer in self.answers:
            conn, _ = self.sock.accept()
            with conn:
                (n,) = struct.unpack("<I", snowflock._recv_exact(conn, 4))
                self.requests.append(json.loads(snowflock._recv_exact(conn, n)))
                if isinstance(answer, dict):
                    body = json.dumps(answer).encode()
                    answer = struct.pack("<I", len(body)) + body
                conn.sendall(answer)

    def close(self):
        self.thread.join(5)
        self.sock.close()


class SnowflockTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="sf-py-")
        self.path = os.path.join(self.dir, "agent.sock")
        os.environ[snowflock.SOCKET_ENV] = self.path

    def tearDown(self):
        del os.environ[snowflock.SOCKET_ENV]
        shutil.rmtree(self.dir)

    def test_calls_and_wire_format(self):
        kids = [{"clone_id": 1, "vm": "v-c1", "state": "exited", "code": 0},
                {"clone_id": 2, "vm": "v-c2", "state": "lost", "reason": "clone QEMU process died"}]
        fake = FakeAgent(self.path, [
            {"result": "ticket", "ticket": "t-ab", "granted": 2},
            {"result": "cloned", "clone_id": 0, "ticket": "t-ab"},
            {"result": "joined", "children": kids},
            {"result": "killed", "children": []},
            {"result": "identity", "vm": "v", "clone_id": 3, "ticket": "t-ab", "ip": "10.0.0.4"},
            {"result": "status", "state": "active", "children": kids},
        ])
        t = snowflock.request_ticket(3)
        self.assertEqual(t, ("t-ab", 2))
        self.assertEqual(snowflock.clone(t), 0)
        self.assertEqual(snowflock.join("t-ab"), kids)
        self.assertEqual(snowflock.kill("t-ab"), [])
        self.assertEqual(snowflock.id(), {"vm": "v", "clone_id": 3, "ticket": "t-ab", "ip": "10.0.0.4"})
        self.assertEqual(snowflock.status(t), {"state": "active", "children": kids})
        fake.close()
        self.assertEqual(fake.requests, [
            {"op": "request_ticket", "n": 3},
            {"op": "clone", "ticket": "t-ab"},
            {"op": "join", "ticket": "t-ab"},
            {"op": "kill", "ticket": "t-ab"},
            {"op": "id"},
            {"op": "status", "ticket": "t-ab"},
        ])

    def test_independence_flag(self):
        fake = FakeAgent(self.path, [
            {"result": "ticket", "ticket": "t-1", "granted": 1},
            {"result": "ticket", "ticket": "t-2", "granted": 1},
            {"result": "ticket", "ticket": "t-3", "granted": 1},
        ])
        self.assertEqual(snowflock.request_ticket(1, independent=True), ("t-1", 1))
        self.assertEqual(snowflock.request_ticket(1, independent=False), ("t-2", 1))
        self.assertEqual(snowflock.request_ticket(1, independent=None), ("t-3", 1))
        with self.assertRaises(TypeError):
            snowflock.request_ticket(1, independent=1)
        fake.close()
        self.assertEqual(fake.requests, [
            {"op": "request_ticket", "n": 1, "independent": True},
            {"op": "request_ticket", "n": 1, "independent": False},
            {"op": "request_ticket", "n": 1},
        ])

    def test_api_error_is_raised_with_code(self):
        fake = FakeAgent(self.path, [{"result": "error", "code": "wrong_role", "message": "Only clones may exit"}])
        with self.assertRaises(snowflock.Error) as cm:
            snowflock.exit(1)
        self.assertEqual(cm.exception.code, "wrong_role")
        self.assertEqual(str(cm.exception), "Only clones may exit")
        fake.close()
        self.assertEqual(fake.requests, [{"op": "exit", "status": 1}])

    def test_protocol_errors(self):
        fake = FakeAgent(self.path, [
            struct.pack("<I", 0xFFFFFFFF),            # oversized answer
            struct.pack("<I", 3) + b"{{{",             # not JSON
            b"\x01",                                   # truncated
            {"result": "exiting"},                    # wrong answer kind
        ])
        for _ in range(4):
            with self.assertRaises(snowflock.Error) as cm:
                snowflock.id()
            self.assertEqual(cm.exception.code, "protocol")
        fake.close()

    def test_agent_not_running(self):
        with self.assertRaises(snowflock.Error) as cm:
            snowflock.id()
        self.assertEqual(cm.exception.code, "agent_unreachable")
        self.assertTrue(str(cm.exception).startswith(
            "Cannot reach the snowflock agent at %s: " % self.path), str(cm.exception))


if __name__ == "__main__":
    unittest.main()
