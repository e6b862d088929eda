#!/usr/bin/env python3
"""Compile the C programs shown in the README (and docs pages that hold a
complete program) so that the documentation cannot rot.

usage: check_snippets.py SOURCE_ROOT CC [FILE.md ...]
A ```c block that defines main() is compiled and linked against nothing
(-fsyntax-only) with the project's headers.  Prints
"snippets: N passed, N failed".
"""
import os
import re
import subprocess
import sys
import tempfile

root, cc = sys.argv[1], sys.argv[2]
pages = sys.argv[3:] or ["README.md"]
cflags = subprocess.run(["pkg-config", "--cflags", "libuv"],
                        stdout=subprocess.PIPE, text=True).stdout.split()
passed = failed = 0
for page in pages:
    text = open(os.path.join(root, page)).read()
    for i, block in enumerate(re.findall(r"```c\n(.*?)```", text, re.S)):
        if "main(" not in block:
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as f:
            f.write(block)
        r = subprocess.run([cc, "-std=c11", "-D_GNU_SOURCE", "-Wall",
                            "-Wextra", "-Wno-unused-parameter", "-Werror",
                            "-fsyntax-only", "-I" + os.path.join(root,
                                                                 "include"),
                            *cflags, f.name],
                           stderr=subprocess.PIPE, text=True)
        os.unlink(f.name)
        name = "%s block %d" % (page, i + 1)
        if r.returncode == 0:
            passed += 1
            print("ok   " + name, file=sys.stderr)
        else:
            failed += 1
            print("FAIL %s\n%s" % (name, r.stderr), file=sys.stderr)
print("snippets: %d passed, %d failed" % (passed, failed))
sys.exit(1 if failed or not passed else 0)
