"""
Start-up failures are one line naming what failed and the way out, exit
status 1, nothing left in RUNDIR and no traceback: the real C{ipcd} command
and C{twistd ipcd} in subprocesses, and L{IPCDService} in this process.
Also what start-up does besides: the open-files limit, and the warning for
twistd's own C{--rundir}; and a reload, which goes through the same checks.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ipcd.config import MAX_ERROR, load_config
from ipcd.daemons import StartupError
from ipcd.listenerkeys import check_listener_key
from ipcd.tap import IPCDService
from ipcd.test.support import (
    TIMEOUT,
    accepts,
    free_port,
    left_in,
    lookup,
    make_config,
    python_env,
    read_only,
    read_text,
    short_rundir,
    spawn,
)
from ipcd.test.tlssupport import TestCA

TWISTD = "from twisted.scripts.twistd import run; run()"
IPCD = ["-m", "ipcd.scripts.ipcd"]


def busy_port(case: SynchronousTestCase) -> int:
    """A port on 127.0.0.1 that something listens on for the whole test."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    case.addCleanup(sock.close)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return int(sock.getsockname()[1])


class CommandFailureTests(SynchronousTestCase):
    """
    The real commands refusing to start: status 1 within a bounded time,
    exactly one line of output, and RUNDIR as it was (empty but for
    ipcd's lock file, which stays).
    """

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-su-")
        os.chmod(self.rundir, 0o1770)
        self.work = short_rundir(self, "ipcd-work-")

    def refused(
        self,
        args: list[str],
        rundir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> str:
        rundir = self.rundir if rundir is None else rundir
        log = os.path.join(self.work, "out.log")
        env = python_env() if env is None else env
        process = spawn(self, args, log, env, self.work)
        try:
            code = process.wait(3 * TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after {3 * TIMEOUT:g} s:\n{read_text(log)}")
        output = read_text(log)
        self.assertEqual(code, 1, output)
        if os.path.isdir(rundir):
            self.assertEqual(left_in(rundir), [], output)
        lines = output.splitlines()
        self.assertEqual(len(lines), 1, output)
        return lines[0]

    def ipcd(self, *options: str) -> str:
        return self.refused([*IPCD, "--rundir", self.rundir, *options])

    def twistd(self, *options: str) -> str:
        return self.refused(
            ["-c", TWISTD, "-n", "--pidfile=", "ipcd", "--rundir", self.rundir]
            + list(options)
        )

    def test_portInUse(self) -> None:
        """
        tcpd's listener is the last to start: ipcd, the control socket and
        pongd listened already, and their sockets are gone again.
        """
        port = busy_port(self)
        expected = (
            f"ipcd: cannot listen on 127.0.0.1:{port}: address already in use "
            "(another ipcd? use --tcp ENDPOINT or --no-tcp)"
        )
        listen = f"tcp:{port}:interface=127.0.0.1"
        self.assertEqual(self.ipcd("--tcp", listen), expected)
        self.assertEqual(self.twistd("--tcp", listen), expected)

    def test_tlsListenerOfTcpdOrTlsd(self) -> None:
        """
        tcpd or tlsd on a TLS listener (C{ssl:}, C{tls:}, inside
        C{haproxy:} too) is refused at start, in one line with the way out:
        it started, logged each lookup "ok", and its client never got an
        answer (tcpd relays the raw socket, TLS-wrapped; tlsd speaks TLS
        itself).  Nothing needs to listen, so no files need exist.
        """
        for option, listen, way_out in (
            ("--tcp", "ssl:9444:privateKey=/k.pem", "listen on tcp: here"),
            ("--tcp", "haproxy:tls:/d:9444", "listen on tcp: here"),
            ("--tls", "tls:/d:9444", "write it as tcp:PORT"),
            ("--tls", "haproxy:ssl:9444:privateKey=/k.pem", "write it as tcp:PORT"),
        ):
            line = self.ipcd(option, listen)
            section = "tcpd" if option == "--tcp" else "tlsd"
            self.assertTrue(
                line.startswith(
                    f"ipcd: command line: [{section}] listen: {listen!r}: "
                ),
                line,
            )
            self.assertIn(way_out, line)

    def test_rundirReadOnly(self) -> None:
        reason = read_only(self, self.rundir)
        self.assertEqual(
            self.ipcd("--no-tcp", "--no-ws"),
            f"ipcd: cannot take ipcd's lock {self.rundir}/.ipcd-lock: {reason} "
            f"(make RUNDIR {self.rundir} writable for ipcd, or use another "
            "--rundir)",
        )

    def test_rundirTooLong(self) -> None:
        """
        A RUNDIR too long for its sockets' paths: one line naming it, and
        nothing made (not a traceback, since the socket endpoints check
        their paths when made).
        """
        path = os.path.join(self.work, "d" * (110 - len(self.work)))
        line = self.refused(
            [*IPCD, "--rundir", path, "--no-tcp", "--no-ws"], rundir=path
        )
        self.assertTrue(line.startswith("ipcd: rundir: the socket path '"), line)
        self.assertIn("AF_UNIX takes at most 107 (a shorter rundir, or name)", line)
        self.assertFalse(os.path.lexists(path))

    def test_rundirNotADirectory(self) -> None:
        path = os.path.join(self.work, "file")
        with open(path, "w"):
            pass
        line = self.refused(
            [*IPCD, "--rundir", path, "--no-tcp", "--no-ws"], rundir=path
        )
        self.assertEqual(
            line,
            f"ipcd: unsafe RUNDIR {path}: not a directory (a regular file); "
            "remove it or choose another --rundir",
        )
        inside = os.path.join(path, "run")
        line = self.refused(
            [*IPCD, "--rundir", inside, "--no-tcp", "--no-ws"], rundir=inside
        )
        self.assertEqual(
            line,
            f"ipcd: cannot create RUNDIR {inside}: {path} is not a directory (a "
            "regular file); choose another --rundir",
        )

    def test_twoPluginsClaimOneScheme(self) -> None:
        """
        A third party's plugin claims 'tcp' too: both commands name both
        plugin modules in one line, and say the way out.
        """
        plugins = os.path.join(self.work, "third", "twisted", "plugins")
        os.makedirs(plugins)
        with open(os.path.join(plugins, "other_tcpd.py"), "w") as f:
            f.write("from ipcd.daemons.tcp import TcpDaemon\n\nmine = TcpDaemon()\n")
        env = python_env()
        env["PYTHONPATH"] += os.pathsep + os.path.join(self.work, "third")
        expected = (
            "ipcd: two protocol daemons claim 'tcpd': <tcpd> from "
            "twisted.plugins.ipcd_daemons and <tcpd> from "
            "twisted.plugins.other_tcpd (remove one of those plugins)"
        )
        for args in (
            [*IPCD, "--rundir", self.rundir],
            ["-c", TWISTD, "-n", "--pidfile=", "ipcd", "--rundir", self.rundir],
        ):
            self.assertEqual(self.refused(args, env=env), expected)

    def test_unknownEndpointType(self) -> None:
        for line in (self.ipcd("--tcp", "foo:bar"), self.twistd("--tcp", "foo:bar")):
            self.assertTrue(
                line.startswith(
                    "ipcd: command line: [tcpd] listen: unknown endpoint type "
                    "'foo' in 'foo:bar' (known: "
                ),
                line,
            )

    def test_nothingToListenOnRefusedAtLoad(self) -> None:
        """
        A listener that names nothing to listen on is a configuration
        error, in one line naming the option's key and what is missing:
        C{haproxy:} with nothing after it passed the check and failed at
        start in Twisted's words; C{unix:} with no path failed at start
        too, leaving C{.lock} in ipcd's working directory.
        """
        self.assertEqual(
            self.twistd("--tcp", "haproxy:"),
            "ipcd: command line: [tcpd] listen: 'haproxy:' wraps no listener: "
            "write one after 'haproxy:' (haproxy:tcp:9000:interface=127.0.0.1)",
        )
        for listen in ("unix:", "haproxy:unix:"):
            self.assertEqual(
                self.ipcd("--no-tcp", "--ws", listen),
                f"ipcd: command line: [websocketd] listen: invalid endpoint "
                f"'{listen}': no socket path (unix:/run/ipcd/NAME.sock)",
            )
        self.assertEqual(os.listdir(self.work), ["out.log"])

    def test_numberNotInAsciiDigits(self) -> None:
        """
        A listener's port in another script's digits is refused in one line
        naming it, by both commands: Twisted's int() read it, and ipcd
        listened on that port (here one in use: 'address already in use').
        """
        port = busy_port(self)
        arabic = str(port).translate({ord("0") + d: 0x0660 + d for d in range(10)})
        listen = f"tcp:{arabic}:interface=127.0.0.1"
        expected = (
            f"ipcd: command line: [tcpd] listen: invalid endpoint {listen!r}: "
            f"port {arabic!r} is not digits 0-9 only"
        )
        self.assertEqual(self.ipcd("--tcp", listen), expected)
        self.assertEqual(self.twistd("--tcp", listen), expected)

    def test_startErrorOnePrintableLine(self) -> None:
        """
        A start error is one printable line of bounded length whatever the
        configuration names: it quotes a file name (or a host, a socket
        path) as it is, and a newline in one made two lines, a terminal
        escape reached the operator's terminal, and a name of 3 MB was a
        line as long (now under the 1 MiB a configuration file may take).
        """
        config = os.path.join(self.work, "ipcd.toml")
        for name, said in (
            ("/nonexistent/a\\u001b[2J\\nb", "/nonexistent/a\\x1b[2J\\x0ab"),
            ("/" + "x" * 1_000_000, "/xxx"),
        ):
            with open(config, "w") as f:
                f.write(f'[tlsd]\ncertificate = "{name}"\nkey = "/nonexistent/k"\n')
            for line in (
                self.ipcd("--config", config, "--no-tcp", "--no-ws"),
                self.twistd("--config", config, "--no-tcp", "--no-ws"),
            ):
                self.assertTrue(
                    line.startswith(f"ipcd: [tlsd] certificate: cannot read {said}"),
                    line[:200],
                )
                self.assertTrue(line.isprintable(), line[:200])
                self.assertLessEqual(len(line), len("ipcd: ") + MAX_ERROR, line[:200])
                if said == "/xxx":
                    self.assertIn("characters left out", line)

    def test_configFileNamePrintable(self) -> None:
        """
        A configuration error names the file as it is written, with what
        does not print escaped: a newline in its name made two lines, and
        an escape in it reached the terminal.
        """
        directory = os.path.join(self.work, "a\x1b[2J\nb")
        os.mkdir(directory)
        config = os.path.join(directory, "ipcd.toml")
        with open(config, "w") as f:
            f.write("[tcpd]\nlisten = 'tcp:x'\n")
        shown = os.path.join(self.work, "a\\x1b[2J\\x0ab", "ipcd.toml")
        expected = (
            f"ipcd: {shown}: [tcpd] listen: invalid endpoint 'tcp:x': 'x' is not a "
            "whole number"
        )
        self.assertEqual(self.ipcd("--config", config), expected)
        self.assertEqual(self.twistd("--config", config), expected)

    def test_pluginEndpointFails(self) -> None:
        """A plugin's endpoint that cannot be made: systemd passed no socket."""
        self.assertEqual(
            self.ipcd("--tcp", "systemd:domain=INET:index=0"),
            "ipcd: cannot make tcpd's listener 'systemd:domain=INET:index=0': "
            "systemd passed no such socket (use --tcp ENDPOINT or --no-tcp)",
        )

    def test_endpointFileMissing(self) -> None:
        """An ssl: listener whose certificate is missing: the file is named."""
        issued = TestCA(self.work).issue("localhost")
        missing = os.path.join(self.work, "missing.pem")
        listen = f"ssl:0:interface=127.0.0.1:privateKey={issued.key}:certKey={missing}"
        self.assertEqual(
            self.ipcd("--no-tcp", "--ws", listen),
            f"ipcd: cannot make websocketd's listener '{listen}': certKey: cannot "
            f"read {missing}: No such file or directory (use --ws ENDPOINT or --no-ws)",
        )

    def test_listenerKeyNotSecret(self) -> None:
        """
        An ssl: listener's key that others may read is refused, as tlsd's
        is, for websocketd's listener and the metrics'; a missing one is
        named as the key.
        """
        issued = TestCA(self.work).issue("localhost")
        os.chmod(issued.key, 0o640)
        listen = f"ssl:0:interface=127.0.0.1:privateKey={issued.key}"
        why = (
            f"privateKey: {issued.key} is readable by group or others (mode "
            f"0640): chmod 600 {issued.key}"
        )
        self.assertEqual(
            self.ipcd("--no-tcp", "--ws", f"haproxy:{listen}:certKey={issued.cert}"),
            f"ipcd: cannot make websocketd's listener 'haproxy:{listen}:certKey="
            f"{issued.cert}': {why} (use --ws ENDPOINT or --no-ws)",
        )
        self.assertEqual(
            self.ipcd("--no-tcp", "--no-ws", "--metrics", listen),
            f"ipcd: cannot make the metrics listener '{listen}': {why} (use "
            "--metrics ENDPOINT or leave it off)",
        )
        missing = os.path.join(self.work, "missing.pem")
        listen = f"ssl:0:interface=127.0.0.1:privateKey={missing}"
        self.assertEqual(
            self.ipcd("--no-tcp", "--ws", listen),
            f"ipcd: cannot make websocketd's listener '{listen}': privateKey: "
            f"cannot read {missing}: No such file or directory (use --ws "
            "ENDPOINT or --no-ws)",
        )

    def test_listenerCertificateIsAFifo(self) -> None:
        """
        An ssl: listener's certificate that is a FIFO is refused in one
        line; Twisted's parser would wait on it for a writer, for ever.
        """
        issued = TestCA(self.work).issue("localhost")
        fifo = os.path.join(self.work, "cert.fifo")
        os.mkfifo(fifo)
        listen = f"ssl:0:interface=127.0.0.1:privateKey={issued.key}:certKey={fifo}"
        self.assertEqual(
            self.ipcd("--no-tcp", "--ws", listen),
            f"ipcd: cannot make websocketd's listener '{listen}': certKey: {fifo} "
            "is a FIFO, not a file: name the file itself (use --ws ENDPOINT or "
            "--no-ws)",
        )

    def test_listenerFilesByPosition(self) -> None:
        """
        An ssl: listener's files given by position (Twisted's
        C{ssl:PORT:KEY:CERT}) are the ones checked: the key was taken for
        Twisted's default, C{server.pem}, and the listener refused.
        """
        issued = TestCA(self.work).issue("localhost")
        check_listener_key(f"ssl:0:{issued.key}:{issued.cert}:TLS_METHOD:127.0.0.1")
        fifo = os.path.join(self.work, "cert.fifo")
        os.mkfifo(fifo)
        listen = f"haproxy:ssl:0:{issued.key}:{fifo}"
        self.assertEqual(
            self.ipcd("--no-tcp", "--ws", listen),
            f"ipcd: cannot make websocketd's listener '{listen}': certKey: {fifo} "
            "is a FIFO, not a file: name the file itself (use --ws ENDPOINT or "
            "--no-ws)",
        )

    def test_listenerWithoutCertificate(self) -> None:
        """
        An ssl: listener given only its key (no certKey=: Twisted reads the
        certificate from the key's file), or a certKey= with no certificate
        in it: one line naming the file, not OpenSSL's "no start line".
        """
        issued = TestCA(self.work).issue("localhost")
        listen = f"ssl:0:interface=127.0.0.1:privateKey={issued.key}"
        self.assertEqual(
            self.ipcd("--no-tcp", "--ws", listen),
            f"ipcd: cannot make websocketd's listener '{listen}': certKey: "
            f"{issued.key} holds no PEM certificate (without certKey=, the "
            "certificate is read from privateKey=: name its file with certKey=) "
            "(use --ws ENDPOINT or --no-ws)",
        )
        listen += f":certKey={issued.key}"
        self.assertEqual(
            self.ipcd("--no-tcp", "--no-ws", "--metrics", listen),
            f"ipcd: cannot make the metrics listener '{listen}': certKey: "
            f"{issued.key} holds no PEM certificate (use --metrics ENDPOINT or "
            "leave it off)",
        )

    def test_listenerKeyEncrypted(self) -> None:
        """
        An ssl: listener's encrypted key is refused in one line; OpenSSL's
        loader, as Twisted calls it, would ask for its passphrase on the
        terminal and wait.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = os.path.join(self.work, "locked.key")
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(pem)
        listen = f"ssl:0:interface=127.0.0.1:privateKey={key}"
        self.assertEqual(
            self.ipcd("--no-tcp", "--ws", listen),
            f"ipcd: cannot make websocketd's listener '{listen}': privateKey: "
            f"{key} is encrypted (ipcd asks no passphrase): openssl pkey -in "
            f"{key} -out KEY.pem, and name KEY.pem (use --ws ENDPOINT or --no-ws)",
        )

    def test_unknownGroup(self) -> None:
        config = os.path.join(self.work, "ipcd.toml")
        with open(config, "w") as f:
            f.write('[control]\ngroup = "nosuchgroup"\n')
        expected = (
            f"ipcd: {config}: [control] group: no such group 'nosuchgroup' "
            "(create it, or name one that exists: getent group)"
        )
        self.assertEqual(self.ipcd("--no-tcp", "--no-ws", "--config", config), expected)
        self.assertEqual(
            self.twistd("--no-tcp", "--no-ws", "--config", config), expected
        )

    def test_tlsSecretsReadableByOthers(self) -> None:
        """A PSK secrets file with mode 0644 is refused before anything listens."""
        secrets = os.path.join(self.work, "psk.txt")
        with open(secrets, "w") as f:
            f.write("alice:" + "a1" * 16 + "\n")
        os.chmod(secrets, 0o644)
        config = os.path.join(self.work, "ipcd.toml")
        with open(config, "w") as f:
            f.write(f'[tlsd]\npsk_file = "{secrets}"\n')
        expected = (
            f"ipcd: [tlsd] psk_file: {secrets} is readable by group or others "
            f"(mode 0644): chmod 600 {secrets} (fix it, or use --no-tls)"
        )
        self.assertEqual(self.ipcd("--no-tcp", "--config", config), expected)
        self.assertEqual(self.twistd("--no-tcp", "--config", config), expected)

    def config_in(self, directory: str, text: str) -> str:
        """An ipcd.toml in C{directory} (not the working directory)."""
        os.makedirs(directory, exist_ok=True)
        config = os.path.join(directory, "ipcd.toml")
        with open(config, "w") as f:
            f.write(text)
        return config

    def test_secretsPathIsADirectory(self) -> None:
        """
        C{psk_file = "psk"} where C{psk} is a directory: one line, no
        traceback; and the relative name is the config file's C{psk}, not
        the working directory's.
        """
        etc = os.path.join(self.work, "etc")
        os.makedirs(os.path.join(etc, "psk"))
        with open(os.path.join(self.work, "psk"), "w") as f:  # not this one
            f.write("alice:" + "a1" * 16 + "\n")
        config = self.config_in(etc, '[tlsd]\npsk_file = "psk"\n')
        expected = (
            f"ipcd: [tlsd] psk_file: {etc}/psk is a directory, not a file: name "
            "the file itself (fix it, or use --no-tls)"
        )
        self.assertEqual(self.ipcd("--no-tcp", "--no-ws", "--config", config), expected)
        self.assertEqual(
            self.twistd("--no-tcp", "--no-ws", "--config", config), expected
        )

    def test_keyPathIsADirectory(self) -> None:
        """A key path that is a directory is said to be one (not: chmod it)."""
        etc = os.path.join(self.work, "etc")
        os.makedirs(os.path.join(etc, "keys"), mode=0o755)
        issued = TestCA(etc).issue("localhost")
        config = self.config_in(
            etc,
            f'[tlsd]\ncertificate = "{os.path.basename(issued.cert)}"\nkey = "keys"\n',
        )
        self.assertEqual(
            self.ipcd("--no-tcp", "--no-ws", "--config", config),
            f"ipcd: [tlsd] key: {etc}/keys is a directory, not a file: name the "
            "file itself (fix it, or use --no-tls)",
        )

    def test_websocketCaNotAFile(self) -> None:
        """
        A directory, or a FIFO with no writer, is refused at start in one
        line: the FIFO is not waited on (nor at each wss:// lookup, in the
        reactor's thread).
        """
        for kind, make in (("a directory", os.mkdir), ("a FIFO", os.mkfifo)):
            etc = os.path.join(self.work, kind.split()[1])
            os.makedirs(etc)
            make(os.path.join(etc, "ca"))
            config = self.config_in(etc, '[websocketd]\nca = "ca"\n')
            self.assertEqual(
                self.ipcd("--no-tcp", "--no-tls", "--ws", "tcp:0", "--config", config),
                f"ipcd: [websocketd] ca: cannot read {etc}/ca as a PEM certificate: "
                f"is {kind}, not a file: name the file itself (fix it, or leave "
                "ca empty for the system's roots)",
            )

    def test_configIsAFifo(self) -> None:
        """--config naming a FIFO with no writer: one line, not a hang."""
        config = os.path.join(self.work, "ipcd.toml")
        os.mkfifo(config, 0o644)
        expected = f"ipcd: {config}: is a FIFO, not a file: name the file itself"
        self.assertEqual(self.ipcd("--config", config), expected)
        self.assertEqual(self.twistd("--config", config), expected)

    def test_optionError(self) -> None:
        """Not after twistd's 20 lines of help, and status 1 from both."""
        self.assertEqual(
            self.ipcd("--bogus"),
            "ipcd: option --bogus not recognized (see ipcd --help)",
        )
        self.assertEqual(
            self.twistd("--bogus"),
            "ipcd: option --bogus not recognized (see twistd ipcd --help)",
        )
        self.assertEqual(
            self.ipcd("--redirect", "a"),
            "ipcd: --redirect takes \"FROM TO\" (two words), got 'a' (see ipcd --help)",
        )
        self.assertEqual(
            self.ipcd("--route", "far"),
            "ipcd: --route takes \"SERVICE URI\" (two words), got 'far' (see ipcd "
            "--help)",
        )
        # A scheme nothing serves: at start, not at the first lookup.
        self.assertEqual(
            self.ipcd("--route", "far http://example.net:80/far"),
            "ipcd: command line: [routes] far: no transport for scheme 'http' "
            "(known: tcp, tls, udp, unix, ws, wss; another needs an external "
            "daemon in [ipcd] external_daemons)",
        )


class ServiceFailureTests(SynchronousTestCase):
    """L{IPCDService} started in this process: all sockets or none."""

    def test_portInUse(self) -> None:
        rundir = short_rundir(self, "ipcd-su-")
        port = busy_port(self)
        config = make_config(
            rundir, tcpd={"enabled": True, "listen": f"tcp:{port}:interface=127.0.0.1"}
        )
        service = IPCDService(config, reactor)
        error = self.assertRaises(StartupError, service.startService)
        self.assertEqual(
            str(error),
            f"cannot listen on 127.0.0.1:{port}: address already in use "
            "(another ipcd? use --tcp ENDPOINT or --no-tcp)",
        )
        self.assertFalse(service.running)
        # Closed at once, not on a later reactor turn: nothing is left.
        self.assertEqual(left_in(rundir), [])

    def test_interfaceNotAnAddress(self) -> None:
        """
        An interface that is no address (getaddrinfo's error, whose code is
        no errno): its own words, not "unknown error -2".
        """
        rundir = short_rundir(self, "ipcd-su-")
        config = make_config(
            rundir, tcpd={"enabled": True, "listen": "tcp:0:interface=x..y"}
        )
        error = self.assertRaises(
            StartupError, IPCDService(config, reactor).startService
        )
        self.assertEqual(
            str(error),
            "cannot listen on x..y:0: name or service not known (x..y names "
            "none of this host's addresses: use --tcp ENDPOINT with one of those "
            "that ip address lists, or --no-tcp)",
        )
        self.assertEqual(left_in(rundir), [])


class RunningCommandTests(SynchronousTestCase):
    """What a start-up that succeeds does besides listening."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-su-")
        self.work = short_rundir(self, "ipcd-work-")
        self.log = os.path.join(self.work, "out.log")

    def started(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        env = python_env(RUNDIR=self.rundir)
        process = spawn(self, args, self.log, env, self.work, **kwargs)
        self.process = process
        control = os.path.join(self.rundir, "ipcd-control")
        deadline = time.monotonic() + 3 * TIMEOUT
        while not accepts(control):
            if process.poll() is not None:
                self.fail(f"exited with {process.returncode}:\n{read_text(self.log)}")
            if time.monotonic() > deadline:
                self.fail(f"not listening after {3 * TIMEOUT:g} s")
            time.sleep(0.05)
        return process

    def assertLogged(self, text: str) -> None:
        """
        Wait (bounded) for C{text} in the output: the sockets accept before
        twistd starts logging (and replays what start-up logged).
        """
        deadline = time.monotonic() + 3 * TIMEOUT
        while text not in read_text(self.log):
            if time.monotonic() > deadline:
                self.fail(f"{text!r} not logged:\n{read_text(self.log)}")
            time.sleep(0.05)

    def quiet_start(self, command: list[str]) -> list[str]:
        """
        Start C{command} with tcpd and websocketd on free ports, GET the
        page twice, then look pong up through tcpd: the lines logged, once
        that lookup's decision is.
        """
        tcp, ws = free_port(), free_port()
        listen = ["--tcp", f"tcp:{tcp}:interface=127.0.0.1"]
        listen += ["--ws", f"tcp:{ws}:interface=127.0.0.1", "--allow", "in pong"]
        self.started(command + listen)
        self.assertLogged("ipcd: ready")
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", ws), TIMEOUT) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                while sock.recv(65536):
                    pass
        route = f"pong tcp://127.0.0.1:{tcp}/pong"
        reply = lookup(self.rundir, f"pong;{route}".encode())
        self.addCleanup(reply.close_fds)
        self.assertEqual((reply.data, len(reply.fds)), (b"ok", 1))
        self.assertLogged("out 'pong' for")
        self.addresses = {
            "ipcd": f"{self.rundir}/ipc and {self.rundir}/ipcd-control",
            "pongd": f"{self.rundir}/pong",
            "tcpd": f"127.0.0.1:{tcp}",
            "websocketd": f"127.0.0.1:{ws}",
        }
        return read_text(self.log).splitlines()

    def assertQuiet(self, texts: list[str]) -> None:
        """
        One line per daemon with its address, then one "ready" line; after
        it, the lookup's two decisions (in and out) and nothing else: no
        line per page GET, no line per listener or factory from Twisted.
        """
        ours = [t for t in texts if " listening on " in t]
        self.assertEqual(
            ours, [f"{name} listening on {at}" for name, at in self.addresses.items()]
        )
        [ready] = [i for i, t in enumerate(texts) if t.startswith("ipcd: ready: ")]
        self.assertEqual(
            texts[ready],
            "ipcd: ready: "
            + ", ".join(f"{name} {at}" for name, at in self.addresses.items()),
        )
        after = texts[ready + 1 :]
        self.assertEqual(len(after), 2, after)
        self.assertTrue(after[0].startswith("in 'pong' for 127.0.0.1:"), after)
        self.assertTrue(after[1].startswith("out 'pong' for pid "), after)
        for text in texts:
            self.assertNotIn(" starting on ", text)
            self.assertNotIn("Starting factory", text)

    def test_quietTextLog(self) -> None:
        """twistd -n ipcd and the ipcd command log the same few lines."""
        for command in (
            ["-c", TWISTD, "-n", "--pidfile=", "ipcd", "--rundir", self.rundir],
            [*IPCD, "--rundir", self.rundir],
        ):
            lines = self.quiet_start(command)
            self.assertQuiet([line.split("] ", 1)[1] for line in lines])
            for line in lines:
                self.assertRegex(line, r"^\S+ \[[^]]+\] ")
            self.process.send_signal(signal.SIGINT)
            self.process.wait(3 * TIMEOUT)

    def test_quietJsonLog(self) -> None:
        """
        ipcd --json-log: the same lines, as C{text}, with ipcd's fields as
        plain values and none of Twisted's internals.
        """
        lines = self.quiet_start([*IPCD, "--rundir", self.rundir, "--json-log"])
        events = [json.loads(line) for line in lines]
        self.assertQuiet([event["text"] for event in events])
        for event in events:
            self.assertEqual(
                [k for k in event if k.startswith("log_") or "__" in k], [], event
            )
            self.assertIn(event["level"], ("info", "warn"))
            self.assertIsInstance(event["time"], float)
        [ready] = [e for e in events if e["text"].startswith("ipcd: ready")]
        self.assertEqual(ready["daemons"]["pongd"], [f"{self.rundir}/pong"])
        [out] = [e for e in events if e["text"].startswith("out 'pong'")]
        self.assertEqual(
            (out["direction"], out["service"], out["allowed"]), ("out", "pong", True)
        )
        self.assertEqual(out["labels"], sorted(out["labels"]))

    def test_openFilesLimitRaised(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        low = min(256, hard)
        if low == hard:
            raise SkipTest(f"the hard limit ({hard}) leaves nothing to raise")

        def lower() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

        process = self.started([*IPCD, "--no-tcp", "--no-ws"], preexec_fn=lower)
        with open(f"/proc/{process.pid}/limits") as f:
            [line] = [row for row in f if row.startswith("Max open files")]
        self.assertEqual(line.split()[3:5], [str(hard), str(hard)], line)
        self.assertLogged(
            f"open files: raised the soft limit from {low} to the hard limit {hard}"
        )

    def test_twistdRundirWarning(self) -> None:
        """
        C{twistd --rundir DIR ipcd}: DIR is twistd's working directory, and
        ipcd, left on its default RUNDIR, says so.
        """
        self.started(
            ["-c", TWISTD, "-n", "--pidfile=", "--rundir", self.work, "ipcd"]
            + ["--no-tcp", "--no-ws"]
        )
        self.assertLogged(
            f"twistd --rundir {self.work} is twistd's working directory, not "
            f"ipcd's RUNDIR, which is {self.rundir}; put ipcd's after the plugin "
            "name: twistd ipcd --rundir DIR"
        )


class ReloadTests(SynchronousTestCase):
    """A reload goes through L{load_config}: its checks and its source."""

    def setUp(self) -> None:
        self.rundir = short_rundir(self, "ipcd-su-")
        self.work = short_rundir(self, "ipcd-work-")
        self.config = os.path.join(self.work, "ipcd.toml")
        self.write("")

    def write(self, text: str) -> None:
        with open(self.config, "w") as f:
            f.write(text)

    def service(self, path: str | None) -> IPCDService:
        layer = {"rundir": self.rundir, "tcpd": {"enabled": False}}
        return IPCDService(
            load_config(path, layer, {}),
            reactor,
            lambda: load_config(path, layer, {}),
        )

    def test_badGroupOrEndpointRefused(self) -> None:
        service = self.service(self.config)
        before = service.config
        self.write('[control]\ngroup = "nosuchgroup"\n')
        answer = service.reload()
        self.assertFalse(answer["ok"])
        self.assertIn("no such group 'nosuchgroup'", answer["error"])
        self.write('[tcpd]\nlisten = "foo:bar"\n')
        answer = service.reload()
        self.assertFalse(answer["ok"])
        self.assertIn("unknown endpoint type 'foo'", answer["error"])
        self.assertIs(service.config, before)

    def test_numberNotInAsciiDigitsRefused(self) -> None:
        """A reload with a listener's number in other digits keeps the old."""
        service = self.service(self.config)
        before = service.config
        self.write("[websocketd]\nlisten = 'tcp:8080:backlog=\u0665\u0660'\n")
        answer = service.reload()
        self.assertFalse(answer["ok"])
        self.assertIn(
            "[websocketd] listen: invalid endpoint 'tcp:8080:backlog=\u0665\u0660': "
            "backlog '\u0665\u0660' is not digits 0-9 only",
            answer["error"],
        )
        self.assertIs(service.config, before)

    def test_commandLineOnly(self) -> None:
        """Without a file, the log does not say "reloaded from None"."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertTrue(self.service(None).reload()["ok"])
        [text] = [
            formatEvent(e) for e in events if "reloaded" in e.get("log_format", "")
        ]
        self.assertEqual(
            text,
            "configuration reloaded from the command line only (no --config file): "
            "nothing changed",
        )


class ListenHintTests(SynchronousTestCase):
    """The way out fits the cause (pure logic: Twisted's errors, made here)."""

    def hint(self, interface: str, port: int, cause: OSError) -> str:
        from twisted.internet.error import CannotListenError

        from ipcd.daemons import listen_hint

        return listen_hint(CannotListenError(interface, port, cause), "tcp")

    def test_nameOfNoAddress(self) -> None:
        """A name that resolves to none of this host's addresses."""
        cause = socket.gaierror(-2, "Name or service not known")
        self.assertEqual(
            self.hint("nosuch.invalid", 9000, cause),
            "nosuch.invalid names none of this host's addresses: use --tcp "
            "ENDPOINT with one of those that ip address lists, or --no-tcp",
        )

    def test_otherCausesAsBefore(self) -> None:
        """Denied on a port above the privileged ones: no word of privilege."""
        import errno

        from ipcd.daemons import unprivileged_port_start

        denied = OSError(errno.EACCES, "Permission denied")
        port = unprivileged_port_start()
        self.assertEqual(
            self.hint("127.0.0.1", port, denied), "use --tcp ENDPOINT or --no-tcp"
        )
        if port > 1:  # (a kernel may let anyone bind every port)
            privileged = self.hint("127.0.0.1", port - 1, denied)
            self.assertIn("CAP_NET_BIND_SERVICE", privileged)
        busy = OSError(errno.EADDRINUSE, "Address already in use")
        self.assertEqual(
            self.hint("127.0.0.1", 9000, busy),
            "another ipcd? use --tcp ENDPOINT or --no-tcp",
        )
