#!/usr/bin/env python3
"""Runs a Python asyncore/asynchat peer unchanged on uvasyncore's drop-in.

Usage: py_uvasyncore.py PEER.py ARGS...
   e.g. py_uvasyncore.py bench/peers/py_asyncore_echo.py 5555
        py_uvasyncore.py bench/peers/py_asynchat_line.py 5555

uvasyncore.install() makes the peer's "import asyncore"/"import asynchat"
give the drop-in (docs/python.md); the peer's own code is not touched.  The
package is taken from $UVASYNCORE_PYTHON, else from build/shim/python of
this checkout (PYTHONPATH works too).
"""
import os
import runpy
import sys

here = os.path.dirname(os.path.abspath(__file__))
pkg = os.environ.get('UVASYNCORE_PYTHON',
                     os.path.join(here, '..', '..', 'build', 'shim', 'python'))
sys.path.insert(0, pkg)
import uvasyncore  # noqa: E402

uvasyncore.install()
if len(sys.argv) < 2:
    sys.stderr.write("usage: py_uvasyncore.py PEER.py ARGS...\n")
    sys.exit(2)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
