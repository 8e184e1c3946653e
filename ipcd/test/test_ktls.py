"""
Kernel TLS (L{ipcd.daemons.tls.ktls}): the probe for the kernel's C{tls}
upper-layer protocol.  Tests that need it skip, saying so, on a kernel
without it (see L{needs_ktls}); the VM test runs them inside a kernel that
has it.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from ipcd.daemons.tls.ktls import ktls_available

NO_KTLS = (
    "this kernel has no tls upper-layer protocol "
    "(net/ipv4/tcp_available_ulp, CONFIG_TLS); the VM test runs these"
)


def needs_ktls(case: type) -> type:
    """Mark test class C{case} to skip where the kernel has no kTLS."""
    if not ktls_available():
        case.skip = NO_KTLS
    return case


class ProbeTests(TestCase):
    def test_cached(self) -> None:
        """The probe answers a bool, the same each time."""
        first = ktls_available()
        self.assertIsInstance(first, bool)
        self.assertIs(ktls_available(), first)

    def test_agrees_with_kernel(self) -> None:
        """
        After the probe (which loads the module if the kernel can), the
        kernel lists C{tls} among its upper-layer protocols exactly when the
        probe says yes.
        """
        available = ktls_available()
        listed = Path("/proc/sys/net/ipv4/tcp_available_ulp")
        if not listed.exists():
            raise self.skipTest("no /proc/sys/net/ipv4/tcp_available_ulp")
        self.assertEqual("tls" in listed.read_text().split(), available)
