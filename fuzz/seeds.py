#!/usr/bin/env python3
"""Writes the proto/ fixtures as binary seed files: fuzz/corpus/<target>/<fixture>.

Every fixture seeds the datagram target; the cn_msg target gets each fixture's netlink
payload (the bytes after the 16-byte header of its first message); the proc_event target
gets the proc_event bytes of the captured proc fixtures (after the 36 bytes of headers).
"""
import os
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
fixtures = os.path.join(root, "proto", "fixtures")
targets = sys.argv[1:] or ["datagram", "cn_msg", "proc_event"]


def load(path):
    out = bytearray()
    with open(path) as f:
        for line in f:
            code = line.split("#", 1)[0]
            out += bytes(int(h, 16) for h in code.split())
    return bytes(out)


for name in sorted(os.listdir(fixtures)):
    if not name.endswith(".hex"):
        continue
    data = load(os.path.join(fixtures, name))
    for t in targets:
        d = os.path.join(root, "fuzz", "corpus", t)
        os.makedirs(d, exist_ok=True)
        if t == "cn_msg":
            seed = data[16:]
        elif t == "proc_event":
            if not name.startswith("proc_") or name.startswith("proc_listen"):
                continue
            seed = data[36:]
        else:
            seed = data
        with open(os.path.join(d, name[:-4]), "wb") as f:
            f.write(seed)
