"""Hostile but fair input for kedit: bad files, and command lines built from every command's
arguments crossed with bad values (paths, numbers, text). ``hostile_lines`` is deterministic;
tests/test_hostile.py drives a session through it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

BAD_NUMBERS = ("nan", "inf", "-inf", "1e309", "-1", "0", "99999999999999999999", "1.5", "abc", "5-0", "3-1", "0x10")
BAD_TEXT = ("", " ", "\x1b[31mred\x1b[0m", "\x00", "é" * 20, "x" * 3000, "->", "\\", "\x07bell")


def write_bad_files(root: Path) -> dict[str, Path]:
    """Damaged, hostile or unreadable files, by name; their paths stand in for FILE arguments."""
    root.mkdir(parents=True, exist_ok=True)
    f: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        f[name] = root / name
        f[name].write_bytes(data)

    put("latin1.jsonl", "caf\xe9 -> th\xe9\n".encode("latin-1"))
    put("nested.json", b"[" * 100_000 + b"]" * 100_000)
    put("empty.json", b"")
    put("notjson.jsonl", b"{not json\n")
    put("numbers.json", json.dumps({"positive": [1, 2], "negative": [3, 4]}).encode())
    put("pairs-numbers.jsonl", b'{"prompt": 1, "positive": 1, "negative": 2}\n')
    put("truncated.gguf", b"GGUF" + struct.pack("<I", 3) + b"\x00" * 5)
    put("garbage.safetensors", b"\xff" * 64)
    put("not-a-session.kedit", b"PK\x03\x04 nothing")
    put("recipe-bad.toml", b"step = [1, 2]\n")

    # vectors whose metadata or tensors are wrong in the ways a hand-made file can be
    def meta(**over: object) -> dict[str, str]:
        fields = {"format": "kedit-steering/1", "model_type": "llama", "hidden_size": 4, "method": "mean_diff"}
        return {"kedit": json.dumps(fields | over)}

    for name, tensors, metadata in (
        ("vec-nan.safetensors", {"layer.1": torch.full((4,), float("nan"))}, meta()),
        ("vec-inf.safetensors", {"layer.1": torch.full((4,), float("inf"))}, meta()),
        ("vec-shape.safetensors", {"layer.1": torch.zeros(7)}, meta()),
        ("vec-meta-list.safetensors", {"layer.1": torch.zeros(4)}, {"kedit": "[]"}),
        ("vec-no-type.safetensors", {"layer.1": torch.zeros(4)}, {"kedit": json.dumps({"format": "kedit-steering/1"})}),
        ("vec-empty.safetensors", {"x": torch.zeros(1)}, meta()),
        ("vec-strength.safetensors", {"layer.1": torch.zeros(4)}, meta(strength=float("nan"))),
    ):
        f[name] = root / name
        save_file(tensors, str(f[name]), metadata=metadata)
    f["dir"] = root / "a-directory"
    f["dir"].mkdir(exist_ok=True)
    return f


def bad_paths(root: Path) -> list[str]:
    """Paths that no command may use: empty, too long, system trees, NUL and escape characters."""
    return [
        "",
        " ",
        "x" * 300,
        "/".join(["d" * 200] * 30),
        "/proc/nope/r.toml",
        "/proc/self/status",
        "/dev/null",
        "a\x00b",
        "\x1b[2J.json",
    ]


def hostile_paths(files: dict[str, Path]) -> list[str]:
    root = next(iter(files.values())).parent
    return [*bad_paths(root), f"{root}/missing/file.json", *(str(p) for p in files.values())]


def hostile_lines(files: dict[str, Path]) -> list[str]:
    """At least 500 lines, every command with bad values in every argument."""
    paths = hostile_paths(files)
    q = '"{}"'.format
    lines: list[str] = []
    prompt, target = "Watts Humphrey attended", "University of Michigan"
    # /edit: each side, each option
    for t in BAD_TEXT:
        lines += [f"/edit {q(t)} -> {q(target)}", f"/edit {q(prompt)} -> {q(t)}"]
        lines += [f"/edit {q(prompt)} -> {q(target)} --subject {q(t)}"]
    lines += [f"/edit {q(prompt)} -> {q(target)} --layer {n}" for n in BAD_NUMBERS]
    lines += [f"/edit {q(prompt)} -> {q(target)} --method {m}" for m in ("nope", "", "ROME;rm")]
    root = next(iter(files.values())).parent
    lines += [f"/edit {q(prompt)} -> {q(target)} --stats-corpus {q(p)}" for p in bad_paths(root)]
    lines += ['/edit "[ ] attended" -> "x"', '/edit "[] attended" -> "x"', "/edit -> x", "/edit x ->", "/edit"]
    lines += [f"/edit {q('word ' * 2000)} -> {q(target)}", f"/edit {q(prompt)} -> {q('word ' * 2000)}"]
    # files read
    for p in paths:
        lines += [f"/eval {q(p)}", f"/load {q(p)}", f"/steer add {q(p)}", f"/steer add {q(p)} 4"]
        lines += [f"/steer train {q(p)}", f"/steer train --pairs {q(p)} -> x"]
        lines += [f"/edit {q(prompt)} -> {q(target)} --paraphrase {q(p)}"]
    lines += [f"/eval {q(str(files['numbers.json']))} --limit {n}" for n in BAD_NUMBERS]
    # files written
    for p in paths:
        lines += [f"/save {q(p)}", f"/export {q(p)}", f"/export {q(p)} --gguf", f"/steer save x {q(p)}"]
        lines += [f"/record start {q(p)}", "/record stop"]
    # numbers
    for n in BAD_NUMBERS:
        lines += [f"/trace {q(prompt)} --samples {n}", f"/steer set mood {n}", f"/rollback {n}", f"/probe {n}"]
        lines += [f"/steer merge a b -> c --weights {n},1", f"/steer merge a b -> c --density {n}"]
        lines += [f"/steer sweep mood --strengths {n}", f"/steer add x --layers {n}"]
    for t in BAD_TEXT:
        lines += [f"/trace {q(prompt)} --target {q(t)}", f"/trace {q(t)}", f"/model {q(t)}", f"/steer {q(t)}"]
        lines += [f"/rollback {q(t)}", f"/help {q(t)}", f"/record {q(t)}", f"/steer remove {q(t)}"]
        lines += [f"/{t}", t[:50] and f"/{t[:50]} x"]
    # grammar
    lines += ['/edit "unterminated', "/", "//", "/ edit", "/edit --subject", "/steer set", "/model --quant 3bit"]
    lines += ["/steer train --layers 5-0 -> x", "/steer train --layers 3-1 -> x", "/steer train --layers -> x"]
    # chat turns
    lines += ["\x1b]0;title\x07hello", "hi " * 40_000, "\x00", "hello"]
    seen: set[str] = set()
    return [x for x in lines if x and not (x in seen or seen.add(x))]
