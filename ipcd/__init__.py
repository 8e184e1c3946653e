"""
ipcd: networking for libipc programs, on Twisted.

A regular package (not a namespace one): C{python -m twisted.trial ipcd}
finds the tests under it only then.
"""
