"""
ipcd: networking for libipc programs, on Twisted.

What other programs use, importable from here (docs/api.rst):

    L{MessageProtocol}, L{MessageFactory}, L{PartialMessageBudget},
    L{MessageTooLarge}          libipc's framing as a Twisted protocol
    L{IPCService}               a Twisted service listening as a libipc service
    L{IPCServerEndpoint}, L{IPCClientEndpoint}
                                the C{ipc:} endpoints
    L{connect}, L{send_message}, L{recv_message}, L{encode},
    L{HandoffError}, L{LookupRefused}
                                the blocking client (no Twisted)
    L{FakeLookupBroker}, L{FakeUNIXTransport}, L{lookup_connection},
    L{LookupFactory}, L{MemoryRelays}
                                in-memory fakes for tests, and the lookup
                                protocol they drive

Each is imported when first asked for: C{import ipcd} imports no Twisted,
the blocking client's names none either, and none imports a reactor.

A regular package (not a namespace one): C{python -m twisted.trial ipcd}
finds the tests under it only then.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Each public name, and the module it lives in.
_HOMES = {
    "MessageProtocol": "ipcd.wire",
    "MessageFactory": "ipcd.wire",
    "PartialMessageBudget": "ipcd.wire",
    "MessageTooLarge": "ipcd.framing",
    "IPCService": "ipcd.services",
    "IPCServerEndpoint": "ipcd.endpoints",
    "IPCClientEndpoint": "ipcd.endpoints",
    "connect": "ipcd.client",
    "send_message": "ipcd.framing",
    "recv_message": "ipcd.framing",
    "encode": "ipcd.framing",
    "HandoffError": "ipcd.handoff",
    "LookupRefused": "ipcd.handoff",
    "FakeLookupBroker": "ipcd.testing",
    "FakeUNIXTransport": "ipcd.testing",
    "lookup_connection": "ipcd.testing",
    "LookupFactory": "ipcd.lookupprotocol",
    "MemoryRelays": "ipcd.testing",
}

__all__ = [*_HOMES, "version"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ipcd' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value  # once: later reads are plain
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def version() -> str:
    """ipcd's version, from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ipcd")
    except PackageNotFoundError:
        return "unknown (not installed)"
