"""uvasyncore: Python's asyncore and asynchat on a libuv core.

    import uvasyncore.asyncore as asyncore
    import uvasyncore.asynchat as asynchat

or, once at start-up, before anything imports them:

    import uvasyncore; uvasyncore.install()    # plain "import asyncore" works

See docs/python.md.
"""

import sys

__all__ = ['install']


def install():
    """Makes "import asyncore" and "import asynchat" give uvasyncore's
    modules (on 3.12+, where the stdlib ones are gone, and on 3.11, where
    they are shadowed).  Call it before those imports: a module that
    already imported the stdlib asyncore keeps it."""
    from uvasyncore import asyncore, asynchat
    sys.modules['asyncore'] = asyncore
    sys.modules['asynchat'] = asynchat
