"""
The kernel TLS tests (modules C{ipcd/test/test_ktls*.py}) in a kernel that
has kTLS: where this one does not, boot a VM whose kernel does
(L{ipcd.test.vm}) and run them there with trial, so the README's one test
command still runs them.  Any failure, error or skip inside fails this test
with the inner trial's output: the VM has the C{tls} upper-layer protocol
and every tool this host has, so a skip there is the harness's fault.

Slow: a minute or two under TCG here (the issue allows up to 10 minutes).
"""

from __future__ import annotations

import glob
import os
import re
import shlex

from twisted.trial.unittest import SynchronousTestCase

from ipcd.test import vm
from ipcd.test.ktlssupport import kernel_has_tls

VM_SECONDS = 600.0


def ktls_modules() -> list[str]:
    """The kernel TLS test modules of this checkout, by dotted name."""
    pattern = os.path.join(vm.CHECKOUT, "ipcd", "test", "test_ktls*.py")
    names = (os.path.basename(path)[: -len(".py")] for path in glob.glob(pattern))
    return [f"ipcd.test.{name}" for name in sorted(names)]


def inner_trial(modules: list[str]) -> str:
    """The shell command running trial on C{modules} inside the VM."""
    return 'exec "$PYTHON" -m twisted.trial --temp-directory=/tmp/_trial_temp ' + (
        " ".join(map(shlex.quote, modules))
    )


def verdict(result: vm.VmResult) -> str | None:
    """What went wrong in the inner trial run, or None if all passed."""
    summary = re.findall(r"^(PASSED|FAILED) \((.*)\)$", result.output, re.M)
    if result.status == vm.NO_TLS_IN_VM:
        return "the VM's kernel has no tls ULP after modprobe tls"
    if result.status != 0 or not summary or summary[-1][0] != "PASSED":
        return f"the kernel TLS tests failed in the VM (exit {result.status})"
    if "skips=" in summary[-1][1]:
        return "kernel TLS tests skipped in the VM, where nothing may be missing"
    if "successes=" not in summary[-1][1]:
        return "no kernel TLS test passed in the VM"
    return None


class KernelTlsInVmTests(SynchronousTestCase):
    def test_ktls_modules_in_vm(self) -> None:
        """
        Every C{test_ktls*} module passes, none skipped, in a VM whose
        kernel has kTLS.
        """
        if kernel_has_tls():
            raise self.skipTest("this kernel has kTLS: test_ktls* run directly")
        tools = vm.find_vm()
        if isinstance(tools, str):
            raise self.skipTest(tools)
        modules = ktls_modules()
        self.assertTrue(modules, "no ipcd/test/test_ktls*.py in this checkout")
        try:
            result = vm.run_in_vm(tools, inner_trial(modules), timeout=VM_SECONDS)
        except vm.VmBusy as e:  # a benchmark's VM, say: not this code's fault
            raise self.skipTest(f"{e}: one VM at a time on this host")
        wrong = verdict(result)
        if wrong is not None:
            self.fail(f"{wrong} ({result.seconds:.0f} s); its output:\n{result.output}")


class VerdictTests(SynchronousTestCase):
    """How the inner trial's output is judged (pure logic)."""

    def judge(self, status: int, output: str) -> str | None:
        return verdict(vm.VmResult(status, output, 1.0))

    def test_passed(self) -> None:
        self.assertIsNone(self.judge(0, "Ran 3 tests\n\nPASSED (successes=3)\n"))

    def test_failed(self) -> None:
        self.assertIn("failed", self.judge(1, "FAILED (failures=1, successes=2)\n"))

    def test_skipped(self) -> None:
        """A skip inside (say, for want of the ULP) is a failure."""
        wrong = self.judge(0, "PASSED (skips=3, successes=1)\n")
        self.assertIn("skipped", wrong)

    def test_nothing_ran(self) -> None:
        self.assertIn(
            "no kernel TLS test", self.judge(0, "PASSED (expectedFailures=1)\n")
        )
        self.assertIn("failed", self.judge(0, "the VM printed nothing useful"))

    def test_no_ulp(self) -> None:
        self.assertIn("no tls ULP", self.judge(vm.NO_TLS_IN_VM, ""))

    def test_modules(self) -> None:
        """The modules run inside are this checkout's test_ktls*, not this one."""
        modules = ktls_modules()
        self.assertIn("ipcd.test.test_ktls_vmprobe", modules)
        self.assertNotIn(__name__, modules)


class FindVmTests(SynchronousTestCase):
    """What is missing is named, with the way to get it."""

    def path_with(self, *tools: str) -> None:
        """PATH holds only C{tools} (each a stand-in script)."""
        directory = self.mktemp()
        os.mkdir(directory)
        for tool in tools:
            stand_in = os.path.join(directory, tool)
            with open(stand_in, "w") as f:
                f.write("#!/bin/sh\nexit 1\n")
            os.chmod(stand_in, 0o755)
        self.patch(os, "environ", {**os.environ, "PATH": directory})
        self.patch(vm.sys, "executable", os.path.join(directory, "python3"))

    def test_no_qemu(self) -> None:
        self.path_with("virtme-run", "busybox")
        self.assertEqual(
            vm.find_vm(), "no qemu-system-x86_64: apt-get install qemu-system-x86"
        )

    def test_no_virtme(self) -> None:
        self.path_with("qemu-system-x86_64", "busybox")
        self.assertEqual(vm.find_vm(), "no virtme-run: pip install virtme-ng")

    def test_no_busybox(self) -> None:
        self.path_with("qemu-system-x86_64", "virtme-run")
        self.assertIn("apt-get install busybox-static", vm.find_vm())
