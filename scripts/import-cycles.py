#!/usr/bin/env python3
"""Reports import circles between the source files of each crate.

A file imports another when it names an item through a path that resolves
into that file: `use crate::a::b::Item`, `crate::a::Item` in an expression,
`super::Item`, `self::child::Item`. A `mod child;` declaration is not an
import. A name reached through a re-export (`pub use spec::DType;` in
lib.rs) counts as an import of the file that defines it, not of the file
that re-exports it.

Exit status 1 and one line per circle when any crate has one, else 0.

    scripts/import-cycles.py [--root DIR] [CRATE_DIR ...]
        (default: this checkout, every workspace crate)
"""

import os
import re
import sys

CRATES = ["kernels-gen", "sdpa-macros", "sdpa-runtime", "sdpa-cli", "tests"]

PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_RE = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", re.S)
MOD_RE = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*([;{])", re.M)


def strip_comments(text):
    """The text without comments and with empty string and char literals."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = len(re.match(r"r(#*)", text[i:]).group(1))
            end = text.find('"' + "#" * hashes, i + 2 + hashes)
            out.append('""')
            i = n if end < 0 else end + 1 + hashes
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            out.append('""')
            i += 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:i + 12]):
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_files(src):
    """Maps module paths (tuples) to files, for one crate root folder."""
    roots = [r for r in ("lib.rs", "main.rs") if os.path.exists(os.path.join(src, r))]
    mods = {}

    def walk(path, file, dirpath):
        mods[path] = file
        text = strip_comments(open(file, encoding="utf-8").read())
        for name, end in MOD_RE.findall(text):
            if end == "{":
                continue  # inline module: stays in this file
            for cand in (os.path.join(dirpath, name + ".rs"), os.path.join(dirpath, name, "mod.rs")):
                if os.path.exists(cand):
                    sub = os.path.join(dirpath, name)
                    walk(path + (name,), cand, sub)
                    break

    graphs = []
    for root in roots:
        mods = {}
        walk((), os.path.join(src, root), src)
        graphs.append((root, dict(mods)))
    return graphs


def expand_use(tree):
    """Expands a use tree (`a::{b, c::d}`) into flat paths."""
    tree = re.sub(r"\s*([{},]|::)\s*", r"\1", re.sub(r"\s+", " ", tree.strip()))
    out = []

    def rec(prefix, t):
        if "{" not in t:
            for part in split_top(t):
                part = part.split(" as ")[0]
                out.append(prefix + part)
            return
        for part in split_top(t):
            if "{" in part:
                head, rest = part.split("{", 1)
                rec(prefix + head, rest[:-1])
            else:
                out.append(prefix + part)

    rec("", tree)
    return [p for p in out if p]


def split_top(t):
    parts, depth, cur = [], 0, ""
    for ch in t:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    parts.append(cur)
    return [p for p in parts if p]


def analyse(mods):
    file_of = mods
    path_of = {f: p for p, f in mods.items()}
    texts = {f: strip_comments(open(f, encoding="utf-8").read()) for f in mods.values()}

    def absolute(cur, kind, segs):
        if kind == "crate":
            return list(segs)
        if kind == "self":
            return list(cur) + list(segs)
        base = list(cur)
        segs = list(segs)
        base = base[:-1]
        while segs and segs[0] == "super":
            base = base[:-1]
            segs = segs[1:]
        return base + segs

    # Re-exports: (module path, name) -> absolute path of the item.
    reexports = {}
    for f, text in texts.items():
        cur = path_of[f]
        for vis, tree in USE_RE.findall(text):
            if not vis:
                continue
            for p in expand_use(tree):
                segs = p.split("::")
                if segs[0] in ("crate", "super", "self"):
                    full = absolute(cur, segs[0], segs[1:])
                elif tuple(cur) + (segs[0],) in file_of:
                    full = list(cur) + segs
                else:
                    full = None  # another crate's item
                reexports[(cur, segs[-1].split(" as ")[-1])] = full

    def resolve(full, depth=0):
        """The file an absolute item path lands in."""
        segs = list(full)
        for n in range(len(segs), -1, -1):
            mod = tuple(segs[:n])
            if mod in file_of:
                rest = segs[n:]
                if rest and depth < 8 and (mod, rest[0]) in reexports:
                    again = reexports[(mod, rest[0])]
                    return None if again is None else resolve(again + rest[1:], depth + 1)
                return file_of[mod]
        return None

    edges = {f: set() for f in texts}
    for f, text in texts.items():
        cur = path_of[f]
        paths = []
        for _vis, tree in USE_RE.findall(text):
            for p in expand_use(tree):
                segs = p.split("::")
                if segs[0] in ("crate", "super", "self"):
                    paths.append((segs[0], segs[1:]))
        for kind, rest in PATH_RE.findall(text):
            paths.append((kind, rest.strip(":").split("::")))
        for kind, segs in paths:
            segs = [s for s in segs if s and s != "*"]
            target = resolve(absolute(cur, kind, segs))
            if target and target != f:
                edges[f].add(target)
    return edges


def cycles(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def main():
    args = sys.argv[1:]
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args[:1] == ["--root"]:
        top, args = os.path.abspath(args[1]), args[2:]
    crates = args or CRATES
    found = 0
    files = 0
    for crate in crates:
        src = os.path.join(top, crate, "src")
        if not os.path.isdir(src):
            continue
        for root, mods in module_files(src):
            edges = analyse(mods)
            files += len(edges)
            for comp in cycles(edges):
                found += 1
                print("import circle: " + " <-> ".join(os.path.relpath(f, top) for f in comp))
    if found:
        sys.exit(1)
    print(f"import-cycles: no import circle among {files} source files")


if __name__ == "__main__":
    main()
