"""
The kernel TLS tests (modules C{ipcd/test/test_ktls*.py}) in a kernel that
has kTLS: where this one does not, boot a VM whose kernel does
(L{ipcd.test.vm}) and run them there with trial, so the README's one test
command still runs them.  Any failure or error inside fails this test with
the inner trial's output, as does a skip for want of kTLS: the VM's kernel
has it, so that is the harness's fault.

Slow: a minute or two under TCG here (the issue allows up to 10 minutes).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from ipcd.daemons.tls.ktls import ktls_available
from ipcd.test import vm
from ipcd.test.ktlssupport import NO_ULP
from ipcd.test.support import TIMEOUT, python_env

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


# A skip reason saying the kernel lacks kTLS (test_ktls's, ktlssupport's).
NO_KTLS = re.compile(
    r"no tls upper-layer protocol|tcp_available_ulp|no kTLS|without kTLS", re.I
).search


def skip_reasons(output: str) -> list[str]:
    """The reasons in trial's C{[SKIPPED]} blocks (reason, blank line, ids)."""
    return [
        block.split("\n\n", 1)[0].strip() for block in output.split("[SKIPPED]\n")[1:]
    ]


def verdict(result: vm.VmResult) -> str | None:
    """What went wrong in the inner trial run, or None if all passed."""
    summary = re.findall(r"^(PASSED|FAILED) \((.*)\)$", result.output, re.M)
    if result.status == vm.NO_TLS_IN_VM:
        return "the VM's kernel has no tls ULP after modprobe tls"
    if result.status != 0 or not summary or summary[-1][0] != "PASSED":
        return f"the kernel TLS tests failed in the VM (exit {result.status})"
    wanting = [reason for reason in skip_reasons(result.output) if NO_KTLS(reason)]
    if wanting:
        return f"kernel TLS tests skipped in the VM for want of kTLS: {wanting[0]}"
    if "successes=" not in summary[-1][1]:
        return "no kernel TLS test passed in the VM"
    return None


class KernelTlsInVmTests(SynchronousTestCase):
    def test_ktls_modules_in_vm(self) -> None:
        """
        Every C{test_ktls*} module passes in a VM whose kernel has kTLS,
        none skipped for want of it.
        """
        if ktls_available():
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
        """A skip inside for want of the ULP is a failure; others are not."""
        trial = (
            "=" * 79 + "\n[SKIPPED]\n{}\n\nipcd.test.test_ktls.T.test_x\n" + "-" * 79
        )
        trial += "\nRan 2 tests in 1.0s\n\nPASSED (skips=1, successes=1)\n"
        for reason in (NO_ULP, "this kernel has no tls upper-layer protocol (x)"):
            wrong = self.judge(0, trial.format(reason))
            self.assertIn("skipped in the VM for want of kTLS", wrong)
            self.assertIn(reason, wrong)
        self.assertIsNone(self.judge(0, trial.format("this kernel has kTLS")))

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


# Run by a Python from a venv under /tmp: the VM script's first part (its
# mounts), then that Python, in a private mount namespace (with a /run of its
# own, so that nothing is made in the host's); what it says, in the result
# folder.
_IN_NAMESPACE = """
import os, sys
from ipcd.test import vm
said = vm.OUT + "/said"
script = "mount -t tmpfs tmpfs /run &&\\n" + vm._prelude(sys.argv[1])
script += 'exec "$PYTHON" -c "import ipcd.test.vm, sys; print(sys.prefix)" >' + said
private = ["unshare", "--mount", "--propagation", "private"]
os.execvp("unshare", [*private, "sh", "-c", script])
"""


class FreshTmpTests(SynchronousTestCase):
    def test_pythonUnderTmp(self) -> None:
        """
        A Python from a venv under /tmp (tox's, a CI's) still runs after the
        VM's fresh /tmp covers the host's: it ended in "exec:
        /tmp/.../bin/python: not found" (status 127) inside the VM.
        """
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise self.skipTest("needs root and unshare(1): a mount namespace")
        base = tempfile.mkdtemp(prefix="ipcd-vm-venv-", dir="/tmp")
        self.addCleanup(shutil.rmtree, base, True)
        venv, shared = os.path.join(base, "venv"), os.path.join(base, "shared")
        os.mkdir(shared)
        made = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip"]
        subprocess.run([*made, venv], check=True, timeout=6 * TIMEOUT)
        python = os.path.join(venv, "bin", "python")
        done = subprocess.run(
            [python, "-c", _IN_NAMESPACE, shared],
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=6 * TIMEOUT,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(os.path.join(shared, "said")) as f:
            self.assertEqual(f.read().strip(), venv)
