"""The SnowFlock VM fork API for Python programs in a snowflock guest.

    import snowflock
    ticket, granted = snowflock.request_ticket(4)
    me = snowflock.clone(ticket)          # 0 in the parent, 1..granted in clones
    if me:
        work(me)
        snowflock.exit(0)                 # ends this clone VM; does not return
    for child in snowflock.join(ticket):  # [{"clone_id": 1, "vm": ..., "state": "exited", "code": 0}, ...]
        print(child)

Every call opens a connection to the agent socket (/run/snowflock/agent.sock,
or $SNOWFLOCK_AGENT_SOCKET) and exchanges one request and one answer: a
little-endian u32 length followed by that many bytes of JSON. Failures raise
snowflock.Error(code, message); code is an API error code such as
"unknown_ticket", or "agent_unreachable" / "protocol" for transport failures.

Pure standard library; no third-party packages.
"""

import json
import os
import socket
import struct
import time

__all__ = ["Error", "request_ticket", "clone", "exit", "join", "kill", "id"]

AGENT_SOCKET = "/run/snowflock/agent.sock"
SOCKET_ENV = "SNOWFLOCK_AGENT_SOCKET"
MAX_FRAME = 4 << 20


class Error(Exception):
    """A failed SnowFlock call: .code (str) and .message (str)."""

    def __init__(self, code, message):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self):
        return self.message


def socket_path():
    """The agent socket path in use."""
    return os.environ.get(SOCKET_ENV) or AGENT_SOCKET


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise Error("protocol", "The agent closed the connection")
        buf += chunk
    return bytes(buf)


def call(request):
    """Sends one request dict and returns the answer dict (errors raised)."""
    path = socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as e:
            raise Error("agent_unreachable",
                        "Cannot reach the snowflock agent at %s: %s" % (path, e.strerror or e)) from None
        try:
            body = json.dumps(request).encode()
            sock.sendall(struct.pack("<I", len(body)) + body)
            (n,) = struct.unpack("<I", _recv_exact(sock, 4))
            if n > MAX_FRAME:
                raise Error("protocol", "Answer of %d bytes exceeds the limit" % n)
            answer = json.loads(_recv_exact(sock, n))
        except OSError as e:
            raise Error("protocol", "Connection to the agent failed: %s" % e) from None
        except ValueError as e:
            raise Error("protocol", "Malformed answer from the agent: %s" % e) from None
    finally:
        sock.close()
    if not isinstance(answer, dict):
        raise Error("protocol", "Malformed answer from the agent")
    if answer.get("result") == "error":
        raise Error(answer.get("code", "failed"), answer.get("message", ""))
    return answer


def _expect(answer, result):
    if answer.get("result") != result:
        raise Error("protocol", "Expected a %r answer, got %r" % (result, answer.get("result")))
    return answer


def _ticket_id(ticket):
    # Accept the (ticket, granted) tuple request_ticket returns, too.
    if isinstance(ticket, tuple):
        ticket = ticket[0]
    return str(ticket)


def _malloc_trim():
    # In-process pre-clone hook: give free heap back so it is never fetched.
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except Exception:
        pass


def request_ticket(n, independent=None):
    """Asks for n clones. Returns (ticket, granted) with granted <= n.

    independent=True: the clones' hosts fetch the whole memory (and disk) of
    the clone point in the background, so the clones stop depending on this
    VM's host once it is there; False: they fetch only what the clones read;
    None: the host's default."""
    request = {"op": "request_ticket", "n": int(n)}
    if independent is not None:
        if not isinstance(independent, bool):
            raise TypeError("independent must be True, False or None")
        request["independent"] = independent
    a = _expect(call(request), "ticket")
    return a["ticket"], a["granted"]


def clone(ticket):
    """Clones this VM. Returns 0 in the parent, the clone ID in each clone."""
    _malloc_trim()
    return _expect(call({"op": "clone", "ticket": _ticket_id(ticket)}), "cloned")["clone_id"]


def exit(status=0):
    """Ends this clone VM with status. Does not return (raises on error)."""
    _expect(call({"op": "exit", "status": int(status)}), "exiting")
    while True:
        time.sleep(3600)


def join(ticket):
    """Waits for every child of ticket. Returns a list of dicts with keys
    clone_id, vm, state ("running", "exited", "killed", "lost") and code
    (exited) or reason (lost)."""
    return _expect(call({"op": "join", "ticket": _ticket_id(ticket)}), "joined")["children"]


def kill(ticket):
    """Ends every child of ticket now. Returns the children like join()."""
    return _expect(call({"op": "kill", "ticket": _ticket_id(ticket)}), "killed")["children"]


def status(ticket):
    """The ticket's state ("granted", "cloning", "active", "discarded") and
    its children now, without waiting: dict with keys state and children
    (like join(), each child with its flock address under "ip")."""
    a = _expect(call({"op": "status", "ticket": _ticket_id(ticket)}), "status")
    return {"state": a["state"], "children": a["children"]}


def id():
    """This VM's identity: dict with vm, clone_id, ticket (or None), ip (or None)."""
    a = _expect(call({"op": "id"}), "identity")
    return {"vm": a["vm"], "clone_id": a["clone_id"], "ticket": a.get("ticket"), "ip": a.get("ip")}
