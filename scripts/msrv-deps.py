#!/usr/bin/env python3
"""Checks that no locked dependency needs a newer Rust than the workspace.

Reads `cargo metadata --locked` and compares every resolved package's
`rust-version` (where it states one) with the workspace's own
(`[workspace.package] rust-version`). The workspace's resolver (2) does not
pick dependencies by rust-version, so a `cargo update` can raise the real
MSRV silently; this catches it. Clippy's `incompatible_msrv` lint checks
the project's own code against the same version (scripts/test.sh).

Exit status 1 and one line per dependency that needs more, else 0.

    scripts/msrv-deps.py
"""

import json
import subprocess
import sys


def version(text):
    """`1.88` or `1.88.0` as a comparable tuple (1, 88, 0)."""
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--locked", "--format-version", "1"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    members = set(meta["workspace_members"])
    resolved = {node["id"] for node in meta["resolve"]["nodes"]}
    packages = [p for p in meta["packages"] if p["id"] in resolved]
    ours = {p["rust_version"] for p in packages if p["id"] in members}
    if len(ours) != 1 or None in ours:
        print(f"msrv-deps: workspace members state rust-version {sorted(map(str, ours))}; "
              "expected one, from [workspace.package]")
        return 1
    msrv = ours.pop()
    newer = sorted(
        (version(p["rust_version"]), p["name"], p["version"])
        for p in packages
        if p["id"] not in members and p.get("rust_version")
        and version(p["rust_version"]) > version(msrv)
    )
    for need, name, ver in newer:
        print(f"msrv-deps: {name} {ver} needs Rust {'.'.join(map(str, need))}, "
              f"newer than the workspace's rust-version {msrv}")
    if not newer:
        highest = max(
            (version(p["rust_version"]), p["name"]) for p in packages
            if p["id"] not in members and p.get("rust_version")
        )
        print(f"msrv-deps: every locked dependency builds with Rust {msrv} "
              f"(the highest need: {highest[1]}, {'.'.join(map(str, highest[0]))})")
    return 1 if newer else 0


if __name__ == "__main__":
    sys.exit(main())
