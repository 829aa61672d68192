#!/usr/bin/env python3
"""Regenerate and check the cnbus golden fixtures (proto/fixtures/*.hex).

Usage (Python 3, standard library only):

  python3 proto/capture.py              capture the live fixtures from the
                                        kernel's proc connector (needs root,
                                        or at least membership of group 1),
                                        then check every fixture
  python3 proto/capture.py --synthetic  rewrite the constructed (not captured)
                                        fixtures, then check every fixture
  python3 proto/capture.py --check      only decode every fixture and compare
                                        it with its "# expect:" line

Captured: proc_ack, proc_fork, proc_exec, proc_exit_nonzero, proc_comm.
Constructed: multi_user, nlmsg_error, nlmsg_noop, nlmsg_overrun,
             proc_listen, proc_listen_filter.

The file format is described in proto/README.md.
"""

import argparse
import ctypes
import datetime
import errno
import os
import platform
import re
import select
import shutil
import socket
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")

# --- constants (see proto/netlink.md, connector.md, proc_event.md) --------
AF_NETLINK = 16
NETLINK_CONNECTOR = 11
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
SO_RCVBUFFORCE = 33

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NL_TYPE_NAMES = {1: "NOOP", 2: "ERROR", 3: "DONE", 4: "OVERRUN"}
NLM_F_CAPPED = 0x100

CN_IDX_PROC, CN_VAL_PROC = 1, 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2

EVENTS = {
    0x00000000: "NONE",
    0x00000001: "FORK",
    0x00000002: "EXEC",
    0x00000004: "UID",
    0x00000040: "GID",
    0x00000080: "SID",
    0x00000100: "PTRACE",
    0x00000200: "COMM",
    0x20000000: "NONZERO_EXIT",  # filter bit only, never on the wire
    0x40000000: "COREDUMP",
    0x80000000: "EXIT",
}
EV = {v: k for k, v in EVENTS.items()}

NLMSGHDR = struct.Struct("=IHHII")      # len type flags seq pid      (16)
CNMSG = struct.Struct("=IIIIHH")        # idx val seq ack len flags   (20)
PEV_HDR = struct.Struct("=IIQ")         # what cpu timestamp_ns       (16)
PROC_EVENT_SIZE = 40
NL_HDRLEN = 16
CN_HDRLEN = 20
EV_OFF = NL_HDRLEN + CN_HDRLEN          # 36: proc_event in a datagram
ED_OFF = EV_OFF + 16                    # 52: event_data in a datagram

# event_data layouts: name -> list of (field, struct code)
EVENT_DATA = {
    "NONE": [("err", "I")],
    "FORK": [("parent_pid", "i"), ("parent_tgid", "i"),
             ("child_pid", "i"), ("child_tgid", "i")],
    "EXEC": [("process_pid", "i"), ("process_tgid", "i")],
    "UID": [("process_pid", "i"), ("process_tgid", "i"),
            ("ruid", "I"), ("euid", "I")],
    "GID": [("process_pid", "i"), ("process_tgid", "i"),
            ("rgid", "I"), ("egid", "I")],
    "SID": [("process_pid", "i"), ("process_tgid", "i")],
    "PTRACE": [("process_pid", "i"), ("process_tgid", "i"),
               ("tracer_pid", "i"), ("tracer_tgid", "i")],
    "COMM": [("process_pid", "i"), ("process_tgid", "i"), ("comm", "16s")],
    "COREDUMP": [("process_pid", "i"), ("process_tgid", "i"),
                 ("parent_pid", "i"), ("parent_tgid", "i")],
    "EXIT": [("process_pid", "i"), ("process_tgid", "i"),
             ("exit_code", "I"), ("exit_signal", "I"),
             ("parent_pid", "i"), ("parent_tgid", "i")],
}
HEX_KEYS = {"nl.flags", "err.nl.flags", "cn.idx", "cn.ack", "exit_code",
            "event_type"}


def align4(n):
    return (n + 3) & ~3


# --- encoding ---------------------------------------------------------------
def nl_cn_msg(idx, val, seq, ack, data=b"", nl_seq=None, nl_pid=0,
              nl_flags=0, cn_flags=0):
    """One nlmsghdr(DONE) + cn_msg + data, zero-padded to a 4-byte boundary.
    nlmsg_len is the exact (unpadded) length, as the kernel's nlmsg_put does."""
    body = CNMSG.pack(idx, val, seq, ack, len(data), cn_flags) + data
    nl_len = NL_HDRLEN + len(body)
    hdr = NLMSGHDR.pack(nl_len, NLMSG_DONE, nl_flags,
                        seq if nl_seq is None else nl_seq, nl_pid)
    return hdr + body + b"\0" * (align4(nl_len) - nl_len)


def proc_ctl(op, seq, ack, event_type=None):
    data = struct.pack("=I", op) if event_type is None else \
        struct.pack("=II", op, event_type)
    return nl_cn_msg(CN_IDX_PROC, CN_VAL_PROC, seq, ack, data)


# --- decoding ---------------------------------------------------------------
def fmt(key, v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, str):
        return v
    if re.sub(r"^m\d+\.", "", key) in HEX_KEYS:
        return hex(v)
    return str(v)


def decode_proc_event(ev):
    what, cpu, ts = PEV_HDR.unpack_from(ev, 0)
    name = EVENTS.get(what, hex(what))
    out = {"what": name, "cpu": cpu, "timestamp_ns": ts}
    off = 16
    for field, code in EVENT_DATA.get(name, []):
        (v,) = struct.unpack_from("=" + code, ev, off)
        off += struct.calcsize(code)
        if field == "comm":
            v = v.split(b"\0", 1)[0].decode("ascii", "replace")
        out[field] = v
    return out


def decode_datagram(buf):
    """Decode every nlmsghdr in buf.  Returns a flat dict of expect keys:
    dgram.len, msgs, m<i>.<key> for every message, and the unprefixed keys
    of message 0 when the datagram holds exactly one message."""
    msgs = []
    off = 0
    while off + NL_HDRLEN <= len(buf):
        nl_len, nl_type, nl_flags, nl_seq, nl_pid = NLMSGHDR.unpack_from(buf, off)
        if nl_len < NL_HDRLEN or off + nl_len > len(buf):
            raise ValueError("bad nlmsg_len %d at offset %d" % (nl_len, off))
        m = {"nl.len": nl_len, "nl.type": nl_type, "nl.flags": nl_flags,
             "nl.seq": nl_seq, "nl.pid": nl_pid}
        payload = buf[off + NL_HDRLEN: off + nl_len]
        if nl_type == NLMSG_ERROR:
            (m["error"],) = struct.unpack_from("=i", payload, 0)
            e = NLMSGHDR.unpack_from(payload, 4)
            for k, v in zip(("len", "type", "flags", "seq", "pid"), e):
                m["err.nl." + k] = v
        elif nl_type == NLMSG_DONE and len(payload) >= CN_HDRLEN:
            idx, val, seq, ack, ln, fl = CNMSG.unpack_from(payload, 0)
            m.update({"cn.idx": idx, "cn.val": val, "cn.seq": seq,
                      "cn.ack": ack, "cn.len": ln, "cn.flags": fl})
            data = payload[CN_HDRLEN: CN_HDRLEN + ln]
            if len(data) != ln:
                raise ValueError("cn.len %d exceeds nlmsg" % ln)
            m["data"] = data
            if idx == CN_IDX_PROC and val == CN_VAL_PROC:
                if ln == PROC_EVENT_SIZE:
                    m.update(decode_proc_event(data))
                elif ln in (4, 8):
                    m["mcast_op"] = struct.unpack_from("=I", data, 0)[0]
                    if ln == 8:
                        m["event_type"] = struct.unpack_from("=I", data, 4)[0]
        msgs.append(m)
        off += align4(nl_len)
    out = {"dgram.len": len(buf), "msgs": len(msgs)}
    for i, m in enumerate(msgs):
        for k, v in m.items():
            out["m%d.%s" % (i, k)] = v
    if len(msgs) == 1:
        out.update(msgs[0])
    return out


def expect_line(d, keys):
    return "# expect: " + " ".join("%s=%s" % (k, fmt(k, d[k])) for k in keys)


# --- fixture file I/O -------------------------------------------------------
def hex_lines(b):
    return [" ".join("%02x" % x for x in b[i:i + 16]) for i in range(0, len(b), 16)]


def write_fixture(name, header, buf, groups, expect):
    """groups: list of (start, end, comment) covering buf in order."""
    pos = 0
    lines = ["# " + h if h else "#" for h in header]
    lines.append(expect)
    for start, end, comment in groups:
        assert start == pos, (name, start, pos)
        lines.append("")
        lines.append("# [%d..%d] %s" % (start, end - 1, comment))
        lines.extend(hex_lines(buf[start:end]))
        pos = end
    assert pos == len(buf), (name, pos, len(buf))
    path = os.path.join(FIXTURES, name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def read_fixture(path):
    data, expect = bytearray(), None
    with open(path) as f:
        for raw in f:
            if raw.startswith("# expect:"):
                if expect is not None:
                    raise ValueError("%s: two expect lines" % path)
                expect = raw[len("# expect:"):].split()
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            toks = line.split()
            if len(toks) > 16:
                raise ValueError("%s: more than 16 bytes on a line" % path)
            for t in toks:
                if len(t) != 2:
                    raise ValueError("%s: bad byte %r" % (path, t))
                data.append(int(t, 16))
    if expect is None:
        raise ValueError("%s: no expect line" % path)
    return bytes(data), [kv.split("=", 1) for kv in expect]


def check_all():
    ok = True
    names = sorted(n for n in os.listdir(FIXTURES) if n.endswith(".hex"))
    for n in names:
        buf, exp = read_fixture(os.path.join(FIXTURES, n))
        d = decode_datagram(buf)
        bad = []
        for k, want in exp:
            if k not in d:
                bad.append("%s missing" % k)
                continue
            got = d[k]
            if isinstance(got, bytes):
                same = got.hex() == want
            elif isinstance(got, str):
                same = got == want
            else:
                same = got == int(want, 0)
            if not same:
                bad.append("%s=%s, decoded %s" % (k, want, fmt(k, got)))
        print("%-24s %3d bytes  %2d keys  %s" % (n, len(buf), len(exp),
                                                 "ok" if not bad else "FAIL"))
        for b in bad:
            print("    " + b)
        ok = ok and not bad
    return ok


# --- annotation helpers -----------------------------------------------------
def g_nlmsghdr(d, base=0, p=""):
    t = d[p + "nl.type"]
    return (base, base + 16,
            "nlmsghdr: len=%d type=%s(%d) flags=%#x seq=%d pid=%d"
            % (d[p + "nl.len"], NL_TYPE_NAMES.get(t, "?"), t, d[p + "nl.flags"],
               d[p + "nl.seq"], d[p + "nl.pid"]))


def g_cnmsg(d, base=16, p=""):
    return [(base, base + 16, "cn_msg: idx=%#x val=%d seq=%d ack=%#x"
             % (d[p + "cn.idx"], d[p + "cn.val"], d[p + "cn.seq"], d[p + "cn.ack"])),
            (base + 16, base + 20, "cn_msg: len=%d flags=%d"
             % (d[p + "cn.len"], d[p + "cn.flags"]))]


def proc_groups(d):
    g = [g_nlmsghdr(d)] + g_cnmsg(d)
    g.append((36, 52, "proc_event: what=%s(%#x) cpu=%d timestamp_ns=%d"
              " (u64 at datagram offset 44, not 8-aligned)"
              % (d["what"], EV[d["what"]], d["cpu"], d["timestamp_ns"])))
    w = d["what"]
    if w == "NONE":
        g += [(52, 56, "event_data.ack: err=%d" % d["err"]),
              (56, 76, "event_data: remainder of the union, zero")]
    elif w == "FORK":
        g += [(52, 68, "event_data.fork: parent_pid=%d parent_tgid=%d child_pid=%d"
               " child_tgid=%d" % (d["parent_pid"], d["parent_tgid"],
                                   d["child_pid"], d["child_tgid"])),
              (68, 76, "event_data: remainder of the union, zero")]
    elif w == "EXEC":
        g += [(52, 60, "event_data.exec: process_pid=%d process_tgid=%d"
               % (d["process_pid"], d["process_tgid"])),
              (60, 76, "event_data: remainder of the union, zero")]
    elif w == "COMM":
        g += [(52, 60, "event_data.comm: process_pid=%d process_tgid=%d"
               % (d["process_pid"], d["process_tgid"])),
              (60, 76, "event_data.comm: comm[16]=%r, NUL-padded" % d["comm"])]
    elif w == "EXIT":
        g += [(52, 68, "event_data.exit: process_pid=%d process_tgid=%d"
               " exit_code=%#x (wait status) exit_signal=%d"
               % (d["process_pid"], d["process_tgid"], d["exit_code"],
                  d["exit_signal"])),
              (68, 76, "event_data.exit: parent_pid=%d parent_tgid=%d"
               % (d["parent_pid"], d["parent_tgid"]))]
    return g


COMMON = ["nl.len", "nl.type", "nl.flags", "nl.seq", "nl.pid",
          "cn.idx", "cn.val", "cn.seq", "cn.ack", "cn.len", "cn.flags"]
PROC_KEYS = ["dgram.len", "msgs"] + COMMON + ["what", "cpu", "timestamp_ns"]


def proc_expect(d):
    return expect_line(d, PROC_KEYS + [f for f, _ in EVENT_DATA[d["what"]]])


# --- live capture -----------------------------------------------------------
class Capture:
    ACK_SEQ, ACK_ACK = 0x1234, 0x10
    COMM = b"cnbus-fixture"

    def __init__(self):
        self.s = socket.socket(AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:  # large buffer: a busy machine must not overrun us (ENOBUFS)
            self.s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        except OSError:
            self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.s.bind((0, 0))                       # kernel assigns the port id
        self.portid = self.s.getsockname()[0]
        self.s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, CN_IDX_PROC)
        self.listening = False
        self.sources = set()

    def send(self, buf):
        self.s.sendto(buf, (0, 0))                # nl_pid 0 = the kernel

    def recv_until(self, want, timeout=5.0):
        """Receive datagrams, calling want(buf, decoded) until it returns True."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out waiting for kernel datagrams")
            r, _, _ = select.select([self.s], [], [], left)
            if not r:
                continue
            try:
                buf, addr = self.s.recvfrom(65536)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise RuntimeError("ENOBUFS: events were lost, rerun")
                raise
            self.sources.add(addr)
            d = decode_datagram(buf)
            if want(buf, d):
                return

    def listen(self):
        req = proc_ctl(PROC_CN_MCAST_LISTEN, self.ACK_SEQ, self.ACK_ACK)
        self.send(req)
        self.listening = True
        got = {}

        def want(buf, d):
            if (d.get("cn.idx") == CN_IDX_PROC and d.get("what") == "NONE"
                    and d.get("cn.ack") == self.ACK_ACK + 1):
                got["ack"] = (buf, d)
                return True
            return False
        self.recv_until(want)
        return got["ack"]

    def ignore(self):
        if self.listening:
            self.send(proc_ctl(PROC_CN_MCAST_IGNORE, self.ACK_SEQ + 1, 0))
            self.listening = False

    def children(self):
        libc = ctypes.CDLL(None, use_errno=True)
        true = shutil.which("true") or "/bin/true"
        a = os.fork()
        if a == 0:                                # child A: rename, exit(3)
            try:
                libc.prctl(15, self.COMM, 0, 0, 0)  # PR_SET_NAME
            finally:
                os._exit(3)
        b = os.fork()
        if b == 0:                                # child B: exec true
            try:
                os.execv(true, [true])
            finally:
                os._exit(127)
        _, sa = os.waitpid(a, 0)
        _, sb = os.waitpid(b, 0)
        if sa != 0x300 or sb != 0:
            raise RuntimeError("unexpected wait status %#x %#x" % (sa, sb))
        return a, b

    def events(self, a, b):
        got = {}

        def want(buf, d):
            if d.get("cn.idx") != CN_IDX_PROC or d.get("cn.len") != PROC_EVENT_SIZE:
                return False
            w = d["what"]
            if w == "FORK" and d["child_tgid"] == a:
                got.setdefault("fork", (buf, d))
            elif w == "COMM" and d["process_tgid"] == a:
                got.setdefault("comm", (buf, d))
            elif w == "EXIT" and d["process_tgid"] == a:
                got.setdefault("exit", (buf, d))
            elif w == "EXEC" and d["process_tgid"] == b:
                got.setdefault("exec", (buf, d))
            return len(got) == 4
        self.recv_until(want)
        return got

    def close(self):
        try:
            self.ignore()     # always: closing alone leaks the listener count
        finally:
            self.s.close()


def capture():
    kver = platform.release()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    me = os.getpid()
    cap = Capture()
    try:
        ack_buf, ack = cap.listen()
        a, b = cap.children()
        ev = cap.events(a, b)
    finally:
        cap.close()

    src = ", ".join("nl_pid=%d nl_groups=%#x" % x for x in sorted(cap.sources))
    base = ["Captured live by proto/capture.py on Linux %s (uname -r), %s, %s,"
            % (kver, platform.machine(), when),
            "host byte order (little-endian).  Source address of kernel datagrams:"
            " %s." % src,
            "Regenerate: python3 proto/capture.py (pids, cpu, seq and timestamps"
            " change on every run)."]
    out = []

    d = ack
    hdr = ["proc_ack.hex - the kernel's ACK (what=NONE) to a PROC_CN_MCAST_LISTEN.",
           "Request: capture.py (port id %d) sent proc_listen.hex to the kernel:"
           % cap.portid,
           "  cn_msg seq=%#x ack=%#x, 4-byte op-only form (so the socket's filter is"
           " ALL)." % (Capture.ACK_SEQ, Capture.ACK_ACK),
           "Reply: cn.ack = request ack + 1 = %#x.  cn.seq (%d) is NOT the request seq"
           % (d["cn.ack"], d["cn.seq"]),
           "(%#x) and cpu (%d) is NOT 0xffffffff: on this kernel the ACK goes through"
           % (Capture.ACK_SEQ, d["cpu"]),
           "the same send path as events, which overwrites both (see proc_event.md)."
           ] + base
    out.append(write_fixture("proc_ack.hex", hdr, ack_buf, proc_groups(d), proc_expect(d)))

    for key, fname, text in (
            ("fork", "proc_fork.hex",
             ["proc_fork.hex - PROC_EVENT_FORK: capture.py (pid %d) forked child"
              " A (pid %d)." % (me, a)]),
            ("exec", "proc_exec.hex",
             ["proc_exec.hex - PROC_EVENT_EXEC: child B (pid %d) of capture.py"
              " (pid %d) exec'd %s." % (b, me, shutil.which("true") or "/bin/true")]),
            ("exit", "proc_exit_nonzero.hex",
             ["proc_exit_nonzero.hex - PROC_EVENT_EXIT: child A (pid %d) called"
              " _exit(3)." % a,
              "exit_code is the raw wait status: 3 << 8 = 0x300 (waitpid() in the"
              " parent returned 0x300);",
              "exit_signal 17 = SIGCHLD (signal sent to the parent), parent = capture.py."]),
            ("comm", "proc_comm.hex",
             ["proc_comm.hex - PROC_EVENT_COMM: child A (pid %d) called"
              " prctl(PR_SET_NAME, %r)." % (a, Capture.COMM.decode())])):
        buf, d = ev[key]
        out.append(write_fixture(fname, text + base, buf, proc_groups(d), proc_expect(d)))
    for p in out:
        print("wrote", os.path.relpath(p, os.path.dirname(HERE)))


# --- constructed fixtures ---------------------------------------------------
def synthetic():
    note = ["CONSTRUCTED by proto/capture.py --synthetic, not captured from the"
            " kernel.", "Host byte order shown little-endian."]
    out = []

    # multi_user.hex: three cn_msgs in one datagram (cnbus user-space bus).
    datas = [b"", b"cnbus", bytes(range(64))]
    buf = b"".join(nl_cn_msg(0x4000, 7, i + 1, 0, data) for i, data in enumerate(datas))
    d = decode_datagram(buf)
    keys = ["dgram.len", "msgs"]
    groups = []
    off = 0
    for i in range(3):
        p = "m%d." % i
        keys += [p + k for k in COMMON + ["data"]]
        groups.append(g_nlmsghdr(d, off, p))
        groups += g_cnmsg(d, off + 16, p)
        dl = d[p + "cn.len"]
        if dl:
            groups.append((off + 36, off + 36 + dl, "data[%d]: %s" % (
                dl, repr(datas[i]) if i == 1 else "bytes 0x00..0x3f")))
        pad = align4(d[p + "nl.len"]) - d[p + "nl.len"]
        if pad:
            groups.append((off + 36 + dl, off + 36 + dl + pad,
                           "padding to a 4-byte boundary (not counted in nlmsg_len)"))
        off += align4(d[p + "nl.len"])
    out.append(write_fixture("multi_user.hex", [
        "multi_user.hex - one user-space datagram carrying three cn_msgs (cnbus"
        " packing).",
        "Each message has its own nlmsghdr(type=DONE); nlmsg_len is exact, the next"
        " header starts",
        "at NLMSG_ALIGN(nlmsg_len).  idx=0x4000 val=7, seq 1,2,3, ack 0, data"
        " lengths 0, 5, 64.",
        "m<i>.data is the payload as hex (empty for message 0)."] + note,
        buf, groups, expect_line(d, keys)))

    # nlmsg_error.hex: error -ENOBUFS quoting a 16-byte header.
    inner = NLMSGHDR.pack(40, NLMSG_DONE, 0, 42, 4660)
    body = struct.pack("=i", -errno.ENOBUFS) + inner
    buf = NLMSGHDR.pack(16 + len(body), NLMSG_ERROR, NLM_F_CAPPED, 42, 0) + body
    d = decode_datagram(buf)
    out.append(write_fixture("nlmsg_error.hex", [
        "nlmsg_error.hex - NLMSG_ERROR, error=-105 (-ENOBUFS), quoting only the"
        " offending 16-byte header",
        "(flags NLM_F_CAPPED=0x100: payload of the quoted message not included)."
        "  The connector never",
        "sends NLMSG_ERROR itself; this exists for decoder robustness."] + note,
        buf, [g_nlmsghdr(d),
              (16, 20, "error: i32 %d (negative errno, ENOBUFS)" % d["error"]),
              (20, 36, "quoted nlmsghdr: len=40 type=DONE(3) flags=0 seq=42 pid=4660")],
        expect_line(d, ["dgram.len", "msgs", "nl.len", "nl.type", "nl.flags",
                        "nl.seq", "nl.pid", "error", "err.nl.len", "err.nl.type",
                        "err.nl.flags", "err.nl.seq", "err.nl.pid"])))

    for name, t, seq, what in (("nlmsg_noop.hex", NLMSG_NOOP, 0, "NLMSG_NOOP"),
                               ("nlmsg_overrun.hex", NLMSG_OVERRUN, 7, "NLMSG_OVERRUN")):
        buf = NLMSGHDR.pack(16, t, 0, seq, 0)
        d = decode_datagram(buf)
        out.append(write_fixture(name, [
            "%s - a bare %s header (no payload).  The kernel does not send this on"
            " the connector" % (name, what),
            "(overruns are reported as recv() failing with ENOBUFS); decoders must"
            " skip it."] + note,
            buf, [g_nlmsghdr(d)],
            expect_line(d, ["dgram.len", "msgs", "nl.len", "nl.type", "nl.flags",
                            "nl.seq", "nl.pid"])))

    # Requests to the proc connector.
    buf = proc_ctl(PROC_CN_MCAST_LISTEN, Capture.ACK_SEQ, Capture.ACK_ACK)
    d = decode_datagram(buf)
    out.append(write_fixture("proc_listen.hex", [
        "proc_listen.hex - PROC_CN_MCAST_LISTEN request, old 4-byte op-only form"
        " (filter = all events).",
        "These are the exact bytes capture.py sends to the kernel before capturing"
        " proc_ack.hex."] + note,
        buf, [g_nlmsghdr(d)] + g_cnmsg(d) + [(36, 40, "data: u32 mcast_op=1 (LISTEN)")],
        expect_line(d, ["dgram.len", "msgs"] + COMMON + ["mcast_op"])))

    evt = EV["FORK"] | EV["EXEC"] | EV["NONZERO_EXIT"]
    buf = proc_ctl(PROC_CN_MCAST_LISTEN, 1, 0, evt)
    d = decode_datagram(buf)
    out.append(write_fixture("proc_listen_filter.hex", [
        "proc_listen_filter.hex - PROC_CN_MCAST_LISTEN with struct proc_input"
        " (Linux 6.6+, 8 bytes):",
        "event_type = FORK|EXEC|NONZERO_EXIT = %#x (exits only with a non-zero"
        " exit_code)." % evt,
        "A socket that sends this receives no ACK (what=NONE is filtered out)."] + note,
        buf, [g_nlmsghdr(d)] + g_cnmsg(d) +
        [(36, 44, "data: struct proc_input mcast_op=1 (LISTEN) event_type=%#x" % evt)],
        expect_line(d, ["dgram.len", "msgs"] + COMMON + ["mcast_op", "event_type"])))
    for p in out:
        print("wrote", os.path.relpath(p, os.path.dirname(HERE)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--synthetic", action="store_true",
                   help="rewrite the constructed fixtures instead of capturing")
    g.add_argument("--check", action="store_true", help="only check fixtures")
    args = ap.parse_args()
    os.makedirs(FIXTURES, exist_ok=True)
    if sys.byteorder != "little":
        sys.exit("fixtures are little-endian; run on a little-endian host")
    if args.synthetic:
        synthetic()
    elif not args.check:
        capture()
    sys.exit(0 if check_all() else 1)


if __name__ == "__main__":
    main()
