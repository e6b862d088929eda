"""Runs CPython's own test_asyncore and test_asynchat, unmodified, against
uvasyncore's drop-in: uvasyncore.install() puts our modules in
sys.modules['asyncore'] / ['asynchat'] before the tests import them.

    PYTHONPATH=<build>/shim/python python3 run_stdlib_tests.py [-v]
        [--testdir DIR] [name...]

--testdir DIR takes test_asyncore.py and test_asynchat.py from DIR (a
CPython 3.11 Lib/test) instead of this Python's test package: how they run
on 3.12+, where they are gone (with that Python's test.support).  Exits 77
(meson: skipped) when the tests are not there (Debian's python3.11: install
libpython3.11-testsuite).  Tests listed in
EXPECTED_FAILURES (each with its reason, also in docs/python.md) may fail;
any other failure, or one of those passing, fails the run.
"""

import importlib
import importlib.util
import os
import sys
import unittest

# "module.Class.test": reason.  Keep docs/python.md's list the same.
EXPECTED_FAILURES = {
}


def import_test(name, testdir):
    if testdir is None:
        return importlib.import_module('test.' + name)
    path = os.path.join(testdir, name + '.py')
    if not os.path.exists(path):
        raise ImportError('no ' + path)
    spec = importlib.util.spec_from_file_location('test.' + name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def load(names, testdir):
    import uvasyncore
    uvasyncore.install()
    modules = []
    for name in names:
        try:
            mod = import_test(name, testdir)
        except ImportError as err:
            print('%s: not available (%s): skipped' % (name, err))
            sys.exit(77)
        for dep in ('asyncore', 'asynchat'):
            used = getattr(mod, dep, None)
            if used is not None and not used.__name__.startswith('uvasyncore'):
                sys.exit('%s uses %s from %s, not the drop-in' %
                         (name, dep, used.__file__))
        modules.append(mod)
    return modules


class Result(unittest.TextTestResult):
    def addFailure(self, test, err):
        self._expected(test, err) or super().addFailure(test, err)

    def addError(self, test, err):
        self._expected(test, err) or super().addError(test, err)

    def addSuccess(self, test):
        if test.id().removeprefix('test.') in EXPECTED_FAILURES:
            self.unexpectedSuccesses.append(test)
        super().addSuccess(test)

    def _expected(self, test, err):
        if test.id().removeprefix('test.') not in EXPECTED_FAILURES:
            return False
        self.expectedFailures.append((test, self._exc_info_to_string(err,
                                                                     test)))
        return True


def main():
    args = sys.argv[1:]
    testdir = None
    if '--testdir' in args:
        i = args.index('--testdir')
        testdir = args[i + 1]
        del args[i:i + 2]
    verbosity = 2 if '-v' in args else 1
    names = [a for a in args if a != '-v'] or ['test_asyncore',
                                               'test_asynchat']
    modules = load(names, testdir)
    loader = unittest.TestLoader()
    suite = unittest.TestSuite(loader.loadTestsFromModule(m) for m in modules)
    runner = unittest.TextTestRunner(verbosity=verbosity, resultclass=Result)
    result = runner.run(suite)
    print('%s: %d run, %d failed, %d errors, %d skipped, '
          '%d expected failures, %d unexpected successes' % (
              ' '.join(names), result.testsRun, len(result.failures),
              len(result.errors), len(result.skipped),
              len(result.expectedFailures), len(result.unexpectedSuccesses)))
    ok = (not result.failures and not result.errors
          and not result.unexpectedSuccesses)
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
