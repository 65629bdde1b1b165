#!/usr/bin/env python3
"""Checks the module map of src/lib.rs: each top-level module of the library imports only from
its own layer or the layers below, but for the two calls of a backing chain's recursion the map
names, and no two modules import each other. Exits non-zero, naming each offending import.

usage: scripts/check-layers.py   (from anywhere; reads src/ of the repository it lives in)
"""
import collections
import os
import re
import sys

# The layers, lowest first, as src/lib.rs's module map gives them.
LAYERS = [
    "error offsets storage direct_io blkdebug lock interrupt size option_list option_desc zeros crypto secret node_name ova",
    "opener chain",
    "block chain_read creation capability check bitmap info prealloc identity host_run",
    "format foreign raw qcow2 luks vdi vhdx vmdk vpc null probe",
    "open image_spec",
    "vma",
    "nbd",
    "live",
    "ops",
]
# A format driver opens its backing file through open::open_layer; the opener reads a json:
# backing file name through image_spec. The opener's NBD storage kind opens exports through
# nbd::client (which itself uses only the host layer), and image_spec reads nbd driver options
# into its locators.
ALLOWED_UP = {
    ("qcow2", "open"),
    ("vmdk", "open"),
    ("opener", "image_spec"),
    ("opener", "nbd"),
    ("image_spec", "nbd"),
}

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
layer_of = {m: i for i, l in enumerate(LAYERS) for m in l.split()}
deps = collections.defaultdict(set)
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs") or f == "main.rs":
            continue
        rel = os.path.relpath(os.path.join(dirpath, f), root)
        top = rel.split(os.sep)[0].removesuffix(".rs")
        if top == "lib":
            continue
        text = open(os.path.join(dirpath, f), encoding="utf-8").read()
        cut = text.find("#[cfg(test)]")
        if cut >= 0:
            text = text[:cut]
        code = "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))
        for m in re.finditer(r"crate::([a-z_0-9]+)", code):
            if m.group(1) != top and m.group(1)[0].islower():
                deps[top].add(m.group(1))

bad = []
for m, ds in sorted(deps.items()):
    for d in sorted(ds):
        if m not in layer_of or d not in layer_of:
            bad.append(f"{m} -> {d}: module not in the map (add it to LAYERS and src/lib.rs)")
        elif layer_of[d] > layer_of[m] and (m, d) not in ALLOWED_UP:
            bad.append(f"{m} -> {d}: imports from a higher layer")
        if m in deps.get(d, ()) and m < d:
            bad.append(f"{m} <-> {d}: the two modules import each other")
for line in bad:
    print(line)
sys.exit(1 if bad else 0)
