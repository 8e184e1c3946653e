"""
ipcd: networking for libipc programs, on Twisted.

A regular package (not a namespace one): C{python -m twisted.trial ipcd}
finds the tests under it only then.
"""


def version() -> str:
    """ipcd's version, from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ipcd")
    except PackageNotFoundError:
        return "unknown (not installed)"
