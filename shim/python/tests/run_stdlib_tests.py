"""Runs CPython's own test_asyncore and test_asynchat, unmodified, against
uvasyncore's drop-in: uvasyncore.install() puts our modules in
sys.modules['asyncore'] / ['asynchat'] before the tests import them.

    PYTHONPATH=<build>/shim/python python3 run_stdlib_tests.py [-v]
        [--testdir DIR] [--users] [name...]

A name is a test module (test_asyncore) or a test in one
(test_ssl.ThreadedTests.test_asyncore_server).  --users runs, instead, the
tests of the standard library's own users of asyncore and asynchat (USERS:
the smtpd module, an FTP server with TLS, a POP3 server with STARTTLS, an
SSL echo server, logging's SMTPHandler), legacy code as a porter's, on the
drop-in unchanged.  Where a Python's tests no longer import the modules
(3.12+: gone, or private copies in test.support), each is skipped, and the
run exits 77 when all are.

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

# The tests of the standard library's users of asyncore/asynchat (3.11):
# the smtpd module's own tests, and smtplib's, poplib's, ftplib's,
# logging's SMTPHandler's and ssl's asyncore echo server, whose servers are
# asyncore dispatchers or async_chat channels (ftplib's and poplib's with
# TLS, smtplib's and logging's the smtpd module).
USERS = ('test_smtpd', 'test_smtplib', 'test_poplib', 'test_ftplib',
         'test_ssl.ThreadedTests.test_asyncore_server',
         'test_logging.SMTPHandlerTest')

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


def drop_in_users(mod):
    """The names of the modules mod uses in place of the stdlib's
    asyncore, asynchat and smtpd, mapped to whether they are the drop-in's
    (smtpd counts when its own asyncore is)."""
    used = {}
    for dep in ('asyncore', 'asynchat', 'smtpd'):
        m = getattr(mod, dep, None)
        if dep == 'smtpd' and m is not None:
            m = getattr(m, 'asyncore', None)
        if m is not None:
            used[dep] = m.__name__.startswith('uvasyncore')
    return used


def load(names, testdir, users):
    """The test suites the names select; exits 77 (skipped) when none is
    there, or, with users, none uses the modules on this Python."""
    import uvasyncore
    uvasyncore.install()
    loader = unittest.TestLoader()
    suites = []
    for name in names:
        modname, _, inner = name.partition('.')
        try:
            mod = import_test(modname, testdir)
        except ImportError as err:
            print('%s: not available (%s): skipped' % (modname, err))
            if users:
                continue
            sys.exit(77)
        used = drop_in_users(mod)
        if users and not any(used.values()):
            print('%s: does not use asyncore or asynchat on this Python: '
                  'skipped' % modname)
            continue
        for dep, ours in used.items():
            if not ours:
                sys.exit('%s uses %s, not from the drop-in' % (modname, dep))
        suites.append(loader.loadTestsFromName(inner, mod) if inner
                      else loader.loadTestsFromModule(mod))
    if not suites:
        sys.exit(77)
    return unittest.TestSuite(suites)


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
    users = '--users' in args
    names = [a for a in args if a not in ('-v', '--users')]
    if not names:
        names = list(USERS) if users else ['test_asyncore', 'test_asynchat']
    suite = load(names, testdir, users)
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
