#!/usr/bin/env python3
"""Writes the seed inputs in fuzz/seeds/<target>/ and the JSON dictionary
fuzz/json.dict. Run from anywhere: python3 fuzz/seeds.py. The seeds are
valid messages of every kind, so the fuzzer starts from inputs that pass
the decoders; the dictionary holds the protocols' field and tag names."""

import base64, json, os, re, struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def write(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def js(v):
    return json.dumps(v, separators=(",", ":")).encode()


b64 = lambda b: base64.b64encode(b).decode()
child = {"clone_id": 2, "vm": "vm1-c2", "state": "exited", "code": 7}
api_req = [
    {"op": "request_ticket", "n": 3}, {"op": "clone", "ticket": "t-1f"},
    {"op": "exit", "status": -1}, {"op": "join", "ticket": "t-ab"},
    {"op": "kill", "ticket": "t-0"}, {"op": "id"},
    {"op": "request_ticket", "n": 2, "independent": True},
]
api_resp = [
    {"result": "ticket", "ticket": "t-1f", "granted": 2},
    {"result": "cloned", "clone_id": 1, "ticket": "t-1f"},
    {"result": "exiting"},
    {"result": "joined", "children": [child, {"clone_id": 3, "vm": "v", "state": "lost", "reason": "x"}]},
    {"result": "killed", "children": [{"clone_id": 1, "vm": "v", "state": "killed"}]},
    {"result": "identity", "vm": "vm1", "clone_id": 0, "ticket": None, "ip": "10.250.1.2"},
    {"result": "error", "code": "no_capacity", "message": "full"},
]
vm = {"name": "vm1", "host": "h0", "state": "running", "ticket": None, "clone_id": 0,
      "parent": "vm1", "ip": "10.250.1.2", "mac": "52:54:00:00:00:01", "mem_mib": 256,
      "vcpus": 1, "accel": "tcg", "pid": 42}
admin_req = [
    {"op": "status"},
    {"op": "vm_start", "name": "vm1", "image": "/img", "mem_mib": 256, "vcpus": 1, "accel": "auto"},
    {"op": "vm_list"}, {"op": "vm_stop", "name": "vm1"}, {"op": "vm_console", "name": "vm1"},
    {"op": "exec", "name": "vm1", "argv": ["sh", "-c", "echo hi"]},
    {"op": "clone_reports"}, {"op": "shutdown"}, {"op": "stats", "name": "vm1"},
    {"op": "vm_list_local"}, {"op": "peer_capacity"},
    {"op": "peer_start_clones", "descriptor": b64(b"SFDESC01"), "clone_ids": [1, 2], "page_server": "10.0.0.1:7000"},
    {"op": "peer_stop_clones", "ticket": "t-1", "reason": "killed"},
    {"op": "peer_child_ended", "ticket": "t-1", "clone_id": 1, "state": {"state": "exited", "code": 0}},
]
admin_resp = [
    {"result": "ok"},
    {"result": "status", "host": "h0", "version": "0.1.0", "pid": 1, "state_dir": "/s", "vms": 1,
     "uptime_s": 5, "accel": "tcg", "counters": {"a": 1}, "peers": ["h1"],
     "recent_losses": [{"vm": "v", "reason": "r"}]},
    dict(result="vm", **vm),
    {"result": "vm_list", "vms": [vm], "unreachable": ["h1: timeout"]},
    {"result": "stats", "vm": "c", "host": "h0", "memory": "remote", "origin": "h1", "faults": 1,
     "bytes_fetched": 4096, "pages_fetched": 1, "zero_pages": 0, "cache_hits": 0,
     "prefetch_hits": 0, "fetch_errors": 0, "latency_p50_us": 10, "latency_p99_us": 99},
    {"result": "capacity", "host": "h1", "free": 3},
    {"result": "clones_started", "results": [{"clone_id": 1, "vm": "c1", "error": None}]},
    {"result": "console", "data": b64(b"login: ")},
    {"result": "exec_output", "stream": "stderr", "data": b64(b"oops\n")},
    {"result": "exec_exit", "code": 137},
    {"result": "clone_reports", "reports": [{"parent": "vm1", "ticket": "t-1", "clones": 2,
     "parent_pause_ms": 12.5, "descriptor_bytes": 60000, "device_state_bytes": 50000,
     "frozen_bytes": 1 << 20, "paused_copy_bytes": 0, "guest_ram_bytes": 1 << 28,
     "all_ready_ms": 250.25, "timeline": [["paused", 0.1], ["ready", 250.25]]}]},
    {"result": "error", "code": "not_found", "message": "no vm"},
]
exec_input = [{"data": b64(b"input\n"), "eof": False}, {"data": "", "eof": True}]
ident = {"clone_id": 1, "ticket": "t-1", "vm": "vm1-c1", "hostname": "vm1-c1",
         "machine_id": "0" * 32, "mac": "52:54:00:00:00:02", "ip_cidr": "10.250.1.3/24",
         "seed": b64(bytes(16)), "unix_time_ns": 1700000000000000000}
guest = [
    {"t": "hello", "version": 1, "agent": "0.1.0", "clone_id": 0, "instance": 99},
    {"t": "request", "id": 1, "req": api_req[0]}, {"t": "ready", "clone_id": 1},
    {"t": "clone_failed", "clone_id": 1, "message": "m"},
    {"t": "exec_output", "exec": 1, "stream": "stdout", "data": b64(b"a\nb")},
    {"t": "exec_exit", "exec": 1, "code": 0}, {"t": "exec_error", "exec": 1, "message": "e"},
    {"t": "pong", "seq": 3},
]
host = [
    {"t": "hello", "version": 1}, {"t": "response", "id": 1, "resp": api_resp[0]},
    {"t": "become_clone", "request_id": 1, "identity": ident},
    {"t": "exec_start", "exec": 1, "argv": ["ls"], "env": [["A", "1"]]},
    {"t": "exec_stdin", "exec": 1, "data": b64(b"x"), "eof": True},
    {"t": "exec_kill", "exec": 1}, {"t": "ping", "seq": 1},
]

for i, m in enumerate(api_req):
    write("api_msg", f"req{i}", b"\x00" + js(m))
for i, m in enumerate(api_resp):
    write("api_msg", f"resp{i}", b"\x01" + js(m))
write("api_msg", "child", b"\x02" + js(child))
sibling = [
    {"uid": 1000, "gid": 1000, "command": "hostname", "cwd": "/root"},
    {"t": "stdin", "data": b64(b"x")}, {"t": "signal", "signo": 2},
    {"t": "exit", "code": 3},
]
for i, m in enumerate(sibling):
    write("sibling_msg", f"m{i}", bytes([[0, 1, 1, 2][i]]) + js(m))
write("sibling_msg", "target", b"\x03" + b"10.250.3.2|10.250.3.1/24")
for i, m in enumerate(admin_req):
    write("admin_msg", f"req{i}", b"\x00" + js(m))
for i, m in enumerate(admin_resp):
    write("admin_msg", f"resp{i}", b"\x01" + js(m))
for i, m in enumerate(exec_input):
    write("admin_msg", f"input{i}", b"\x02" + js(m))

frame = lambda m: struct.pack("<I", len(js(m))) + js(m)
for kind, msgs in enumerate([api_req, api_resp, admin_req, admin_resp, exec_input]):
    for i, m in enumerate(msgs):
        write("frame", f"k{kind}-{i}", bytes([kind]) + frame(m) + frame(msgs[0]))

def chunk(b):
    out = b""
    while b:
        out += b"\x00" + bytes([min(len(b), 255)]) + b[:255]
        b = b[255:]
    return out

for name, msgs in [("guest", guest), ("host", host)]:
    for i, m in enumerate(msgs):
        write("channel_lines", f"{name}{i}", chunk(js(m) + b"\n"))
write("channel_lines", "long-run", b"\x01\x00\x00\x08" + chunk(b"tail\n") + b"\x02")

def fnv1a(b):
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h

meta = {"parent": "vm1", "origin_host": "h0", "ticket": "t-1", "request_id": 7,
        "memory": {"size": 1 << 20, "generation": 1, "source": "h0:vm1-g1", "data_bytes": 4096},
        "machine": {"vcpus": 1, "mem_mib": 1, "accel": "tcg", "image": "/img", "cmdline": "console=ttyS0"},
        "net": {"flock": 3, "subnet": "10.250.3.0/24"},
        "clones": [{"clone_id": 1, "vm": "vm1-c1", "mac": "m", "ip_cidr": "i"}]}
m, state = js(meta), b"QEVM\x00\x00\x00\x03device-state"
holes = struct.pack("<4Q", 0x8, 0, 0, 1 << 63)  # 256 pages
header = b"SFDESC01" + struct.pack("<HHIIIQ", 1, 0, len(m), len(state), len(holes), fnv1a(m + state + holes))
write("descriptor", "valid", header + m + state + holes)
m = js(dict(meta, mcast_port=7404, complete=True))
header = b"SFDESC01" + struct.pack("<HHIIIQ", 1, 0, len(m), len(state), len(holes), fnv1a(m + state + holes))
write("descriptor", "mcast", header + m + state + holes)

name = b"gen-1"
req = b"SFPQ" + struct.pack("<HH", 1, len(name)) + name.ljust(64, b"\0") + struct.pack("<QII", 12, 3, 0)
write("page_wire", "req-ok", req + b"SFPR" + struct.pack("<IQII", 0, 12, 3, 0))
write("page_wire", "req-err", req + b"SFPR" + struct.pack("<IQII", 2, 12, 3, 0))

write("handshake_server", "honest", b"\x81")
write("handshake_server", "honest-flipped", b"\x81" + b"\x00" * 40 + b"\x01")
write("handshake_server", "raw", b"\x00" + bytes(range(64)))
write("handshake_client", "honest", b"\x01" + bytes(40 + 33))
write("handshake_client", "rejected", b"\x01" + bytes(40) + b"\x01" + bytes(32))
write("handshake_client", "cut", b"\x03" + bytes(40) + bytes(10))

# Dictionary: every field and tag name of the JSON protocols.
names = set()
for f in ["proto/src/admin.rs", "proto/src/api.rs", "proto/src/channel.rs", "descriptor/src/lib.rs"]:
    src = open(os.path.join(ROOT, f)).read()
    names |= set(re.findall(r"^\s+(?:pub )?([a-z_][a-z0-9_]*): ", src, re.M))
    for v in re.findall(r"^    ([A-Z][A-Za-z0-9]*)\b", src, re.M):
        names.add(re.sub(r"(?<!^)([A-Z])", r"_\1", v).lower())
with open(os.path.join(HERE, "json.dict"), "w") as f:
    f.write("# Field and tag names of the JSON protocols (written by seeds.py).\n")
    for n in sorted(names):
        f.write(f'"\\"{n}\\""\n')
    for t in ['"{"', '"}"', '"["', '"]"', '":"', '","', '"null"', '"true"', '"false"', '"-1"', '"1e308"', '"\\\\u0000"']:
        f.write(t + "\n")
