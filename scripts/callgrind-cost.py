#!/usr/bin/env python3
"""Instructions per operation under callgrind, split by where they run.

Shared by scripts/msg-cost and scripts/rpc-cost. Runs `program args-for-n`
and `program args-for-0` under callgrind (the second run counts the set-up,
which is subtracted), and prints instructions per operation split into the
crate, capnp, the allocator and the rest. callgrind counts instructions, so
the figures repeat exactly whatever else the machine does.

    callgrind-cost.py LABEL N PROGRAM [ARGS...] -- [ARGS FOR THE 0 RUN...]
        [--functions K]   also list the crate's K costliest functions

Needs valgrind (callgrind_annotate) and python3.
"""
import os
import re
import subprocess
import sys
import tempfile


def classify(fn):
    if "capnp_shm_rpc" in fn:
        return "capnp-shm-rpc (network, runner)"
    if re.search(r"\bcapnp_shm::", fn):
        return "capnp-shm (core)"
    if "capnp_rpc" in fn:
        return "capnp-rpc"
    if re.search(r"\bcapnp::", fn):
        return "capnp"
    if "futures" in fn:
        return "futures"
    if "malloc" in fn or "alloc" in fn or "free" in fn:
        return "allocator"
    if "memset" in fn or "memcpy" in fn or "memmove" in fn:
        return "memset/memcpy"
    return "other (std, libc, the program)"


def by_source(where):
    """The part a (source file, function) pair counts to by the file its
    lines come from: capnp's code inlined into the crate's functions is
    capnp's, the crate's code inlined into capnp's is the crate's; std's
    generic code (Vec, RefCell, atomics) counts to the function it runs in.
    """
    file, fn = where
    if re.search(r"/capnp-rpc-[0-9]", file):
        return "capnp-rpc"
    if re.search(r"/capnp-[0-9]", file):
        return "capnp"
    if re.search(r"/futures[-a-z]*-[0-9]", file):
        return "futures"
    if file.startswith("capnp-shm-rpc/") or "/capnp-shm-rpc/" in file:
        return "capnp-shm-rpc (network, runner)"
    if not file.startswith("/") and file.startswith(("src/", "examples/")):
        return "capnp-shm (core)" if file.startswith("src/") else "other (std, libc, the program)"
    return classify(fn)


def functions(program, args):
    """Self cost of every (source file, function) pair: the file is where
    the lines come from, so inlined code names its own file."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        subprocess.run(
            ["valgrind", "-q", "--tool=callgrind", f"--callgrind-out-file={out}", program, *args],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        text = subprocess.run(
            ["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", out],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    costs = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*)", line) or re.match(
            r"\s*([\d,]+)\s+(\S.*)", line
        )
        if not m or "PROGRAM TOTALS" in m.group(2) or ":" not in m.group(2):
            continue
        file, fn = m.group(2).split(":", 1)
        fn = re.sub(r"\s*\[[^\]]*\]$", "", fn)
        costs[(file, fn)] = costs.get((file, fn), 0) + int(m.group(1).replace(",", ""))
    return costs


def main():
    argv = sys.argv[1:]
    top = 0
    if "--functions" in argv:
        i = argv.index("--functions")
        top = int(argv[i + 1])
        del argv[i : i + 2]
    label, n, program = argv[0], int(argv[1]), argv[2]
    rest = argv[3:]
    sep = rest.index("--")
    args_n, args_0 = rest[:sep], rest[sep + 1 :]
    full, setup = functions(program, args_n), functions(program, args_0)
    per = {k: (full.get(k, 0) - setup.get(k, 0)) / n for k in full}
    by_fn, by_line = {}, {}
    for (file, fn), v in per.items():
        by_fn[classify(fn)] = by_fn.get(classify(fn), 0) + v
        by_line[by_source((file, fn))] = by_line.get(by_source((file, fn)), 0) + v
    total = sum(by_fn.values())
    print(f"instructions per {label} ({n} of them):")
    print(f"  {'':34} {'function':>8}  {'':6} {'line':>8}")
    for k in sorted(set(by_fn) | set(by_line), key=lambda k: -by_fn.get(k, 0)):
        f, l = by_fn.get(k, 0), by_line.get(k, 0)
        print(f"  {k:34} {f:8.0f}  {100 * f / total:5.1f}% {l:8.0f}  {100 * l / total:5.1f}%")
    print(f"  {'total':34} {total:8.0f}")
    if top:
        print(f"the crate's {top} costliest functions (self, inlined code included):")
        crate = {}
        for (file, fn), v in per.items():
            if classify(fn) == "capnp-shm (core)":
                crate[fn] = crate.get(fn, 0) + v
        for fn, v in sorted(crate.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {v:8.1f}  {fn[:110]}")

if __name__ == "__main__":
    main()
