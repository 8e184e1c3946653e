"""
A throwaway virtual machine for the kernel TLS tests (tests and benchmarks
only).

This host's kernel may lack the C{tls} upper-layer protocol, but a
distribution kernel image usually has it as a module.  L{find_vm} looks for
such an image (C{/boot/vmlinuz-VERSION} with C{net/tls/tls.ko} under
C{/lib/modules/VERSION} and C{depmod} run), C{virtme-run} (pip package
virtme-ng) and C{qemu-system-x86_64}; L{run_in_vm} boots it on the host's
own filesystem, read-only, loads C{tls}, runs one shell command with this
Python and this checkout first on C{PYTHONPATH}, and returns its exit status
and output.  It runs under TCG (emulated CPU; nested KVM is not relied on),
so it is slow: half a minute to boot, then every instruction emulated.

Inside the VM, C{/tmp} (also C{TMPDIR}, C{HOME} and the command's working
directory) and C{/dev/shm} are fresh tmpfs mounts, the rest is read-only;
this interpreter (a venv's too) and the checkout, when they lie under the
host's C{/tmp}, are bound back at their paths in the fresh one;
the shared result folder (9p, where UNIX sockets cannot be bound) is only
for results, at L{OUT}.  virtme-run's own
exit status and console are unreliable: the command's status and output go
to files in the shared folder, and an absent status file means the VM never
ran the command.  One VM at a time per host (C{flock} on L{LOCK}): each
takes a whole core.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# The checkout whose ipcd the VM runs: PYTHONPATH's first entry inside.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCK = os.path.join(tempfile.gettempdir(), "ipcd-test-vm.lock")
# Where the shared result folder is seen inside the VM, once /tmp (where it
# lies on the host) is covered by a tmpfs.
OUT = "/run/ipcd-vm"
# Exit status of the VM's script when modprobe leaves no tls ULP.
NO_TLS_IN_VM = 97


@dataclass(frozen=True)
class VmTools:
    """What booting the VM takes, found on this host."""

    kernel: str  # the kernel image, /boot/vmlinuz-VERSION
    virtme_run: str
    qemu: str


@dataclass(frozen=True)
class VmResult:
    status: int  # the command's exit status inside the VM
    output: str  # its stdout and stderr
    seconds: float  # the whole boot-run-shutdown


class VmError(Exception):
    """The VM did not run the command to its end (with what it printed)."""


class VmBusy(VmError):
    """Another VM on this host kept the lock past the time allowed."""


def _version_key(version: str) -> list[tuple[int, str]]:
    return [
        (int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.-]", version)
    ]


def _has_tls(version: str) -> bool:
    """Kernel C{version}'s modules include tls (or it is built in), indexed."""
    modules = f"/lib/modules/{version}"
    if not os.path.exists(os.path.join(modules, "modules.dep")):
        return False
    if glob.glob(os.path.join(modules, "kernel/net/tls/tls.ko*")):
        return True
    with contextlib.suppress(OSError), open(f"/boot/config-{version}") as f:
        return "CONFIG_TLS=y\n" in f.read()
    return False


def find_kernel() -> str | None:
    """The newest readable /boot/vmlinuz-VERSION whose kernel has kTLS."""
    found = []
    for image in glob.glob("/boot/vmlinuz-*"):
        version = os.path.basename(image)[len("vmlinuz-") :]
        if os.access(image, os.R_OK) and _has_tls(version):
            found.append((_version_key(version), image))
    return max(found)[1] if found else None


def find_vm() -> VmTools | str:
    """The tools for L{run_in_vm}, or what is missing and how to get it."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return "no qemu-system-x86_64: apt-get install qemu-system-x86"
    virtme_run = shutil.which("virtme-run") or _beside_python("virtme-run")
    if virtme_run is None:
        return "no virtme-run: pip install virtme-ng"
    if shutil.which("busybox") is None:
        return "no busybox (virtme-ng's initramfs): apt-get install busybox-static"
    kernel = find_kernel()
    if kernel is None:
        return (
            "no readable /boot/vmlinuz-* with net/tls/tls.ko and modules.dep "
            "under /lib/modules/VERSION: apt-get install linux-image-amd64 "
            "(then depmod VERSION if modules.dep is missing)"
        )
    return VmTools(kernel=kernel, virtme_run=virtme_run, qemu=qemu)


def _beside_python(name: str) -> str | None:
    """A script installed beside this interpreter (a venv not activated)."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.access(path, os.X_OK) else None


# Where the host's directories under /tmp that the command needs are seen
# while /tmp is being covered, before they are bound back in place.
KEPT = "/run/ipcd-vm-kept"


def _under_tmp() -> list[str]:
    """
    This interpreter's (a venv's, its base's) and the checkout's directories
    that lie under /tmp: the VM's fresh /tmp would hide them ("exec:
    /tmp/venv/bin/python: not found"), so they are carried over.
    """
    found: list[str] = []
    for path in (sys.prefix, sys.base_prefix, CHECKOUT):
        for each in (os.path.abspath(path), os.path.realpath(path)):
            if each.startswith("/tmp/") and each not in found:
                found.append(each)
    # A directory inside another one carried is carried with it.
    return [p for p in found if not any(p.startswith(q + "/") for q in found)]


def _prelude(shared: str) -> str:
    """
    The VM's shell script up to the command: its environment, the result
    folder bound at L{OUT}, a fresh /tmp (the working directory) with this
    interpreter's and the checkout's directories under /tmp bound back.
    """
    env = {
        "PATH": os.pathsep.join(
            [os.path.dirname(sys.executable), "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        ),
        "PYTHONPATH": CHECKOUT,
        "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": "/tmp",
        "HOME": "/tmp",
        "PYTHON": sys.executable,
        "IPCD_IN_VM": "1",  # for waits to allow for emulation
    }
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    keep = back = ""
    for index, path in enumerate(_under_tmp()):
        kept, where = shlex.quote(f"{KEPT}/{index}"), shlex.quote(path)
        keep += f"mkdir -p {kept} && mount --bind {where} {kept} &&\n"
        back += f"mkdir -p {where} && mount --bind {kept} {where} &&\n"
    return (
        f"{exports}mkdir -p {OUT} && mount --bind {shlex.quote(shared)} {OUT} &&\n"
        f"{keep}mount -t tmpfs tmpfs /tmp &&\n{back}cd /tmp || exit 1\n"
    )


def _script(command: str, shared: str) -> str:
    """The VM's shell script: load tls, run C{command}, record its status."""
    out, status = f"{OUT}/output", f"{OUT}/status"
    return (
        f"{_prelude(shared)}"
        f"modprobe tls >{out} 2>&1\n"
        f"if ! grep -qw tls /proc/sys/net/ipv4/tcp_available_ulp; then\n"
        f"  echo 'no tls ULP in the VM after modprobe tls' >>{out}\n"
        f"  echo {NO_TLS_IN_VM} >{status}; exit 0\n"
        f"fi\n"
        f"( {command} ) </dev/null >>{out} 2>&1\n"
        f"echo $? >{status}\n"
    )


@contextlib.contextmanager
def _one_vm_at_a_time(timeout: float):  # type: ignore[no-untyped-def]
    with open(LOCK, "a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VmBusy(f"another VM held {LOCK} for {timeout:g} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_in_vm(
    tools: VmTools,
    command: str,
    timeout: float = 600.0,
    memory: str = "1G",
    cpus: int = 1,
) -> VmResult:
    """
    Boot the VM, run shell C{command} in it (cwd C{/tmp}; C{$PYTHON} is
    this interpreter, first on C{PATH}; C{$IPCD_IN_VM} is 1), and return its
    status and output.

    At most C{timeout} seconds for the VM, then qemu is killed and
    L{VmError} raised, as it is when the command's status never arrives; as
    long again waiting for another VM of ours to finish, then L{VmBusy}.
    The temporary folder goes either way.
    """
    shared = tempfile.mkdtemp(prefix="ipcd-vm-")
    try:
        script = os.path.join(shared, "run.sh")
        with open(script, "w") as f:
            f.write(_script(command, shared))
        argv = [
            tools.virtme_run,
            "--kimg",
            tools.kernel,
            "--mods",
            "auto",
            "--disable-kvm",
            "--memory",
            memory,
            "--cpus",
            str(cpus),
            "--rwdir",
            shared,
            "--qemu-bin",
            tools.qemu,
            "--script-sh",
            f"sh {shlex.quote(script)}",
        ]
        with _one_vm_at_a_time(timeout):
            started = time.monotonic()
            console = _boot(argv, shared, timeout)
            seconds = time.monotonic() - started
        output = _read(os.path.join(shared, "output"))
        status = _read(os.path.join(shared, "status")).strip()
        if not status.isdigit():
            raise VmError(
                f"the VM did not run the command ({seconds:.0f} s); its output:\n"
                f"{output}\nvirtme-run's:\n{console[-4000:]}"
            )
        return VmResult(int(status), output, seconds)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def _boot(argv: list[str], shared: str, timeout: float) -> str:
    """Run virtme-run to its end, or kill it and its qemu after C{timeout}."""
    log = os.path.join(shared, "console")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # qemu in its group: one kill ends both
        )
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise VmError(
                f"the VM did not finish in {timeout:g} s; killed. Its output:\n"
                f"{_read(os.path.join(shared, 'output'))[-4000:]}"
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return _read(log)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
