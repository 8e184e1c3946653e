"""
ipcd is nobody's deputy: a local client reaches through a lookup only a
socket it could connect to itself (or what an admin's grant names), never
ipcd's own sockets, and remote peers never reach those either.

The integration tests run clients as other users (children that drop to
other uids and groups), so they need root.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipcd.access import (
    OTHERS,
    SEARCH,
    WRITE,
    AccessDenied,
    Credentials,
    acl_permits,
    may,
    one_name,
    open_socket,
    permitted,
)
from ipcd.control import status_report
from ipcd.errors import Refused
from ipcd.inboundreach import inbound_reach
from ipcd.test.support import (
    ACL_GROUP,
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER,
    ACL_USER_OBJ,
    accepts,
    as_user,
    assert_logged,
    counted_pong,
    logged_lines,
    lookup,
    make_config,
    needs_root,
    recv_upto,
    set_acl,
    short_rundir,
    start_ipcd,
)
from ipcd.test.tcpsupport import bounce_through, start_host, tcp_connect
from ipcd.test.test_accessacl import in_child

# Numeric ids need no entry in /etc/passwd: the kernel checks numbers.
SHARED_GROUP = 61010
ALICE = Credentials(61001, 61001, frozenset({SHARED_GROUP}))
BOB = Credentials(61002, 61002, frozenset({SHARED_GROUP}))
CAROL = Credentials(61003, 61003, frozenset({SHARED_GROUP}))


def _stat(mode: int, uid: int = 1, gid: int = 1) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


class PermittedTests(SynchronousTestCase):
    """The kernel's owner/group/other rule, as a pure function."""

    def test_ownerBits(self) -> None:
        who = Credentials(1, 99)
        self.assertTrue(permitted(_stat(0o200, uid=1), who, WRITE))
        self.assertFalse(permitted(_stat(0o077, uid=1), who, WRITE))
        self.assertTrue(permitted(_stat(0o100, uid=1), who, SEARCH))

    def test_groupBitsByPrimaryOrSupplementaryGroup(self) -> None:
        self.assertTrue(permitted(_stat(0o020, gid=5), Credentials(2, 5), WRITE))
        member = Credentials(2, 9, frozenset({5}))
        self.assertTrue(permitted(_stat(0o020, gid=5), member, WRITE))
        self.assertFalse(permitted(_stat(0o702, gid=5), member, WRITE))

    def test_otherBits(self) -> None:
        self.assertTrue(permitted(_stat(0o002), Credentials(3, 3), WRITE))
        self.assertFalse(permitted(_stat(0o770), Credentials(3, 3), WRITE))

    def test_ownerBitsWinOverOthers(self) -> None:
        """As in the kernel, the owner gets the owner bits even if others get more."""
        self.assertFalse(permitted(_stat(0o077, uid=3, gid=3), Credentials(3, 3), 2))

    def test_othersGetOnlyTheOtherBits(self) -> None:
        """
        A remote peer (L{OTHERS}) owns no file and is in no group, whoever
        owns it: root's group, the first system ids, nobody's.
        """
        for owner in (0, 1, 2, 65534, 2**32 - 2):
            for mode in (0o660, 0o600, 0o060):
                st = _stat(mode, uid=owner, gid=owner)
                self.assertFalse(permitted(st, OTHERS, WRITE), (owner, oct(mode)))
            self.assertTrue(permitted(_stat(0o002, uid=owner, gid=owner), OTHERS, 2))
        self.assertEqual(str(OTHERS), "others")

    def test_rootPasses(self) -> None:
        self.assertTrue(permitted(_stat(0o000), Credentials(0, 0), WRITE | SEARCH))


class AclPermitsTests(SynchronousTestCase):
    """The kernel's POSIX ACL rule (posix_acl_permission), as a pure function."""

    def test_namedUserWithinTheMask(self) -> None:
        st = _stat(0o660, uid=1, gid=5)
        acl = ((ACL_USER_OBJ, 6, 0), (ACL_USER, 6, 2), (ACL_USER, 0, 3))
        acl += ((ACL_GROUP_OBJ, 6, 0), (ACL_MASK, 2, 0), (ACL_OTHER, 6, 0))
        # Its own entry, within the mask; not the group's or the others'.
        self.assertTrue(acl_permits(acl, st, Credentials(2, 5), WRITE))
        self.assertFalse(acl_permits(acl, st, Credentials(2, 5), WRITE | 4))
        self.assertFalse(acl_permits(acl, st, Credentials(3, 5), WRITE))
        # The owner entry is not masked.
        self.assertTrue(acl_permits(acl, st, Credentials(1, 9), WRITE | 4))

    def test_aGroupThatMatchesButGrantsNothingRefuses(self) -> None:
        """A member of a matching group never falls back to the others' entry."""
        st = _stat(0o676, uid=1, gid=5)
        acl = ((ACL_USER_OBJ, 6, 0), (ACL_GROUP_OBJ, 0, 0), (ACL_GROUP, 2, 8))
        acl += ((ACL_MASK, 7, 0), (ACL_OTHER, 6, 0))
        self.assertFalse(acl_permits(acl, st, Credentials(2, 5), WRITE))
        # Any one matching group that grants is enough.
        self.assertTrue(acl_permits(acl, st, Credentials(2, 5, frozenset({8})), 2))
        self.assertTrue(acl_permits(acl, st, Credentials(2, 9), WRITE))

    def test_unknownEntryRefuses(self) -> None:
        """An entry the kernel does not know is its EIO: refused."""
        st = _stat(0o666)
        acl = ((ACL_USER_OBJ, 6, 0), (64, 6, 0), (ACL_OTHER, 6, 0))
        self.assertFalse(acl_permits(acl, st, Credentials(2, 2), WRITE))
        self.assertFalse(acl_permits((), st, Credentials(2, 2), WRITE))


class AclCacheTests(SynchronousTestCase):
    """A file's ACL is read again once changed, however coarse its ctime."""

    def test_changedWithinOneSecondOfCoarseCtime(self) -> None:
        """
        On ext4 with 128-byte inodes a ctime has whole seconds: an ACL
        changed twice within one second keeps one ctime, and the second
        ACL decides (the first was kept, read 0.2 s after its change).
        """
        needs_root()
        path = os.path.join(_coarse_time_filesystem(self), "f")
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o660))
        os.chown(path, BOB.uid, SHARED_GROUP)
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        self.addCleanup(os.close, fd)
        owner, group = (ACL_USER_OBJ, 6, 0), (ACL_GROUP_OBJ, 6, 0)
        mask, others = (ACL_MASK, 6, 0), (ACL_OTHER, 0, 0)
        # Rounds until both changes fall in one second (a loaded machine
        # may take a round past it); the decisions only then.
        for _ in range(20):
            time.sleep(1 - time.time() % 1 + 0.01)  # a second just begun
            set_acl(path, [owner, group, mask, others])
            first = os.fstat(fd)
            time.sleep(0.2)
            allowed = may(fd, first, ALICE, WRITE)
            # Her own entry now refuses her what her group may.
            set_acl(path, [owner, (ACL_USER, 0, ALICE.uid), group, mask, others])
            second = os.fstat(fd)
            if second.st_ctime_ns == first.st_ctime_ns:
                break
        else:
            raise SkipTest("no two changes fell within one second")
        self.assertEqual(first.st_ctime_ns % 1_000_000_000, 0)
        self.assertTrue(allowed)
        self.assertFalse(may(fd, second, ALICE, WRITE))


def _coarse_time_filesystem(case: SynchronousTestCase) -> str:
    """A small ext4 with 128-byte inodes (whole-second times), mounted."""
    image = os.path.join(short_rundir(case, "ipcd-ext4-"), "image")
    mountpoint = short_rundir(case, "ipcd-ext4-")
    with open(image, "wb") as f:
        f.truncate(4 * 1024 * 1024)
    for command in (
        ["mkfs.ext4", "-q", "-F", "-I", "128", image],
        ["mount", "-o", "loop", image, mountpoint],
    ):
        try:
            done = subprocess.run(command, capture_output=True, timeout=60)
        except FileNotFoundError:
            raise SkipTest(f"no {command[0]}") from None
        if done.returncode != 0:
            raise SkipTest(f"{command[0]}: {done.stderr.decode().strip()}")
    case.addCleanup(subprocess.run, ["umount", mountpoint], timeout=60)
    return mountpoint


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    return sock


class OpenSocketTests(SynchronousTestCase):
    """The path walk, on real files (other owners need root)."""

    def setUp(self) -> None:
        self.dir = short_rundir(self, "ipcd-access-")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "s")
        self.addCleanup(_listen(self.path).close)
        os.chmod(self.path, 0o666)

    def open(self, path: str, who: Credentials | None, **kw: Any) -> Any:
        opened = open_socket(path, who, **kw)
        self.addCleanup(opened.close)
        return opened

    def test_opensTheSocketItself(self) -> None:
        opened = self.open(self.path, Credentials(7, 7))
        st = os.stat(self.path)
        self.assertEqual(opened.inode, (st.st_dev, st.st_ino))
        self.assertTrue(stat.S_ISSOCK(opened.stat.st_mode))
        self.assertFalse(opened.via_symlink)

    def test_socketWithoutWritePermission(self) -> None:
        needs_root()
        os.chmod(self.path, 0o664)
        self.assertRaises(AccessDenied, open_socket, self.path, Credentials(7, 7))
        os.chown(self.path, 7, -1)
        self.open(self.path, Credentials(7, 7))

    def test_directoryWithoutSearchPermission(self) -> None:
        needs_root()
        os.chmod(self.dir, 0o750)
        error = self.assertRaises(
            AccessDenied, open_socket, self.path, Credentials(7, 7)
        )
        self.assertIn("uid 7 may not connect to", str(error))
        # Missing or not, the answer is the same: nothing leaks past the
        # directory the client may not search.
        missing = os.path.join(self.dir, "nothing")
        self.assertRaises(AccessDenied, open_socket, missing, Credentials(7, 7))
        self.assertRaises(FileNotFoundError, open_socket, missing, None)

    def test_symlinksFollowedAndChecked(self) -> None:
        needs_root()
        relative = os.path.join(self.dir, "rel")
        os.symlink("s", relative)
        absolute = os.path.join(self.dir, "abs")
        os.symlink(self.path, absolute)
        chained = os.path.join(self.dir, "chain")
        os.symlink("rel", chained)
        for link in (relative, absolute, chained):
            opened = self.open(link, Credentials(7, 7))
            self.assertTrue(opened.via_symlink)
            self.assertEqual(opened.inode[1], os.stat(self.path).st_ino)
        # The link's target is checked as the client: a hidden directory.
        hidden = short_rundir(self, "ipcd-hidden-")
        os.chmod(hidden, 0o700)
        secret = os.path.join(hidden, "secret")
        self.addCleanup(_listen(secret).close)
        os.chmod(secret, 0o666)
        evil = os.path.join(self.dir, "evil")
        os.symlink(secret, evil)
        self.assertRaises(AccessDenied, open_socket, evil, Credentials(7, 7))

    def test_lastSymlinkRefusedWhenAsked(self) -> None:
        link = os.path.join(self.dir, "link")
        os.symlink(self.path, link)
        error = self.assertRaises(
            Refused, open_socket, link, None, follow_last_symlink=False
        )
        self.assertIn("symbolic link", str(error))
        self.open(self.path, None, follow_last_symlink=False)

    def test_symlinkLoop(self) -> None:
        a, b = os.path.join(self.dir, "a"), os.path.join(self.dir, "b")
        os.symlink("b", a)
        os.symlink("a", b)
        error = self.assertRaises(Refused, open_socket, a, None)
        self.assertIn("too many levels", str(error))

    def test_notASocket(self) -> None:
        plain = os.path.join(self.dir, "plain")
        open(plain, "w").close()
        error = self.assertRaises(Refused, open_socket, plain, None)
        self.assertIn("is not a socket", str(error))
        self.assertRaises(Refused, open_socket, self.dir, None)

    def test_secondNameRefusedAndClosed(self) -> None:
        """
        L{one_name}: a socket opened without a permission check (a grant,
        a remote peer's exact rule) that has another name is refused, and
        its descriptor closed.
        """
        os.link(self.path, os.path.join(self.dir, "t"))
        before = sorted(os.listdir("/proc/self/fd"))
        opened = open_socket(self.path, None)
        error = self.assertRaises(Refused, one_name, opened, self.path)
        self.assertIn("with 2 names", str(error))
        self.assertLess(opened.fd, 0)  # closed
        self.assertEqual(sorted(os.listdir("/proc/self/fd")), before)
        # A socket opened as a client that it may reach is its own matter.
        checked = self.open(self.path, Credentials(0, 0))
        self.assertIs(one_name(checked, self.path), checked)

    def test_ipcdAsAnotherUserFollowsRootsLinks(self) -> None:
        """
        ipcd running as an ordinary user follows root's links (C{/var/run}
        -> C{/run}) and its own user's, and no one else's.
        """
        needs_root()
        for name, owner in (("root", 0), ("ipcd", ALICE.uid), ("carol", CAROL.uid)):
            os.symlink("s", os.path.join(self.dir, name))
            os.lchown(os.path.join(self.dir, name), owner, owner)

        def reached(name: str) -> Any:
            def job() -> bool:
                try:
                    open_socket(os.path.join(self.dir, name), BOB).close()
                except Refused:
                    return False
                return True

            return job

        ipcd = Credentials(ALICE.uid, ALICE.gid)
        self.assertEqual(
            [in_child(ipcd, reached(name)) for name in ("root", "ipcd", "carol")],
            [True, True, False],
        )

    def test_connectsToTheCheckedInodeEvenIfSwapped(self) -> None:
        """
        A path replaced between the check and the connect changes nothing:
        the connection goes to the inode that was checked.
        """
        opened = self.open(self.path, None)
        os.rename(self.path, self.path + ".old")
        impostor = _listen(self.path)
        self.addCleanup(impostor.close)
        impostor.setblocking(False)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(opened.connect_path())
        self.assertRaises(BlockingIOError, impostor.accept)


class _LogEvents:
    """Broker decision events, collected while a test runs."""

    def __init__(self, case: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.observe)
        case.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event: dict[str, Any]) -> None:
        if "outcome" in event and "direction" in event:
            self.events.append(event)


class ClientAccessTests(TestCase):
    """
    The group setup docs/securing.rst recommends: RUNDIR and RUNDIR/ipc
    shared with a group, ipcd as root.  Alice is in the group; Bob owns a
    private (0600) service; a directory only root may enter holds another.
    """

    @inlineCallbacks
    def start(self, **overrides: Any) -> Any:
        needs_root()
        self.rundir = short_rundir(self)
        os.chown(self.rundir, 0, SHARED_GROUP)
        os.chmod(self.rundir, 0o1770)
        overrides.setdefault("tcpd", {"listen": "tcp:0:interface=127.0.0.1"})
        self.service = yield start_ipcd(self, make_config(self.rundir, **overrides))
        self.counters = self.service.broker.counters
        for name in ("ipc", "pong"):
            os.chown(os.path.join(self.rundir, name), 0, SHARED_GROUP)
        self.ipc = os.path.join(self.rundir, "ipc")
        # Bob's private service, and a socket in a directory only root enters.
        self.secret = self.serve(os.path.join(self.rundir, "secret"))
        os.chown(os.path.join(self.rundir, "secret"), BOB.uid, BOB.gid)
        os.chmod(os.path.join(self.rundir, "secret"), 0o600)
        hidden = short_rundir(self, "ipcd-hidden-")
        os.chmod(hidden, 0o700)
        self.hidden = self.serve(os.path.join(hidden, "private.sock"))
        os.chmod(os.path.join(hidden, "private.sock"), 0o666)
        # What a group member can plant: links to both, and to pong.
        os.symlink(os.path.join(hidden, "private.sock"), self.at("evil"))
        os.symlink(self.at("secret"), self.at("evil2"))
        os.symlink("pong", self.at("alias"))
        self.log = _LogEvents(self)

    def at(self, name: str) -> str:
        return os.path.join(self.rundir, name)

    def serve(self, path: str) -> Factory:
        return counted_pong(self, path)

    def public_socket(self) -> tuple[str, Factory]:
        """A socket anyone may connect to, outside RUNDIR: path, factory."""
        public = short_rundir(self, "ipcd-public-")
        os.chmod(public, 0o755)
        path = os.path.join(public, "bus.sock")
        factory = self.serve(path)
        os.chmod(path, 0o666)
        return path, factory

    def private_socket(self) -> tuple[str, Factory]:
        """Root's socket (0600), outside RUNDIR: path, factory."""
        return _private_socket(self)

    def connect_as(self, who: Credentials, name: str) -> Any:
        """What C{who}'s own connect() to RUNDIR/NAME does."""
        return as_user(self.at(name), who.uid, who.gid, tuple(who.groups), "connect")

    def lookup_as(self, who: Credentials, payload: str) -> Any:
        return as_user(self.ipc, who.uid, who.gid, tuple(who.groups), payload)

    @inlineCallbacks
    def assertRefused(self, who: Credentials, payload: str, *reason: str) -> Any:
        answer = yield self.lookup_as(who, payload)
        self.assertEqual(answer["fds"], 0, f"a refusal carries no fd: {answer}")
        self.assertTrue(answer["reply"].startswith("ne "), answer)
        for part in reason:
            self.assertIn(part, answer["reply"])
        return answer["reply"]

    @inlineCallbacks
    def test_reachableServiceOk(self) -> Any:
        """Alice may connect to pong herself, so a lookup hands it over."""
        yield self.start()
        direct = yield as_user(
            self.at("pong"), ALICE.uid, ALICE.gid, (61010,), "connect"
        )
        self.assertEqual(direct, {"connected": True})
        answer = yield self.lookup_as(ALICE, "pong;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        # A link to a socket she may reach is followed.
        answer = yield self.lookup_as(ALICE, "alias;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        [event, _] = self.log.events
        self.assertEqual(event["access"], "the client may connect itself")

    @inlineCallbacks
    def test_anotherUsersPrivateSocket(self) -> Any:
        """By name, through her own route, through a link: refused."""
        yield self.start()
        direct = yield self.connect_as(ALICE, "secret")
        self.assertEqual(direct, {"error": "Permission denied"})
        for payload in [
            "secret;",
            "x;x unix://secret",
            "x;x unix:///secret",
            "evil2;",
            "x;x unix://evil2",
        ]:
            yield self.assertRefused(
                ALICE, payload, "permission denied: uid 61001 may not connect"
            )
        self.assertEqual(self.secret.connections, 0)
        # Bob, its owner, gets it.
        answer = yield self.lookup_as(BOB, "secret;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        self.assertEqual(self.counters["access denied"], 5)

    @inlineCallbacks
    def test_aclsDecideAsTheKernel(self) -> Any:
        """
        A socket's POSIX ACL decides a lookup as it decides the client's own
        connect(): an ACL that refuses a user or group the mode bits let
        in, and one that names a user the mode bits do not.
        """
        yield self.start()
        self.serve(self.at("acl"))
        # Mode 0660 (the mask), in the group Alice and Carol are both in.
        os.chown(self.at("acl"), BOB.uid, SHARED_GROUP)
        owner, mask, others = (ACL_USER_OBJ, 6, 0), (ACL_MASK, 6, 0), (ACL_OTHER, 0, 0)
        cases = [
            # The group may, but Alice's own entry says no.
            ([(ACL_USER, 0, ALICE.uid), (ACL_GROUP_OBJ, 6, 0)], {CAROL}),
            # The file's group may not; Carol's own group may.
            ([(ACL_GROUP_OBJ, 0, 0), (ACL_GROUP, 6, CAROL.gid)], {CAROL}),
            # The file's group may not; Alice's own entry says yes.
            ([(ACL_USER, 6, ALICE.uid), (ACL_GROUP_OBJ, 0, 0)], {ALICE}),
        ]
        for entries, allowed in cases:
            set_acl(self.at("acl"), [owner, *entries, mask, others])
            for who in (ALICE, CAROL):
                direct = yield self.connect_as(who, "acl")
                answer = yield self.lookup_as(who, "acl;")
                why = (entries, who.uid, direct, answer)
                self.assertEqual(direct == {"connected": True}, who in allowed, why)
                self.assertEqual(answer["fds"] == 1, who in allowed, why)

    @inlineCallbacks
    def test_linkIntoAHiddenDirectory(self) -> Any:
        """A planted link does not lend ipcd's (root's) reach to the client."""
        yield self.start()
        reply = yield self.assertRefused(ALICE, "evil;", "permission denied")
        self.assertNotIn("private.sock", reply, "the link's target is not told")
        self.assertEqual(self.hidden.connections, 0)

    @inlineCallbacks
    def test_linksOfUsersNotFollowed(self) -> Any:
        """
        A socket anyone may connect to, outside RUNDIR, that trusts its
        clients' SO_PEERCRED (as the D-Bus system bus does): Alice may
        connect herself, and is seen as herself.  Through ipcd she would be
        seen as root, so a link that she (or any user but root) made is
        not followed; the admin's own link is.
        """
        yield self.start()
        bus, factory = self.public_socket()
        direct = yield as_user(bus, ALICE.uid, ALICE.gid, (SHARED_GROUP,), "connect")
        self.assertEqual(direct, {"connected": True})
        os.symlink(bus, self.at("bus"))
        os.lchown(self.at("bus"), ALICE.uid, ALICE.gid)
        for payload in ("bus;", "x;x unix://bus"):
            yield self.assertRefused(
                ALICE, payload, "a symbolic link of uid 61001 on the way"
            )
        # The admin's link is followed; hers to it is still hers.
        os.lchown(self.at("bus"), 0, 0)
        os.symlink("bus", self.at("alias2"))
        os.lchown(self.at("alias2"), ALICE.uid, ALICE.gid)
        yield self.assertRefused(ALICE, "alias2;", "symbolic link of uid 61001")
        self.assertEqual(factory.connections, 1)  # her own, above
        answer = yield self.lookup_as(ALICE, "bus;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})

    @inlineCallbacks
    def test_hardLinksOfOthersNotFollowed(self) -> Any:
        """
        The same through a hard link (a user may make one of a socket that
        is not theirs where fs.protected_hardlinks is 0; here root does):
        another user's socket is reached only by its one name.
        """
        yield self.start()
        bus, factory = self.public_socket()
        os.link(bus, self.at("bus"))
        for payload in ("bus;", "x;x unix://bus"):
            yield self.assertRefused(ALICE, payload, "a socket of uid 0 with 2 names")
        self.assertEqual(factory.connections, 0)
        # Her own socket she may name twice; root's with one name is served.
        os.chown(bus, ALICE.uid, ALICE.gid)
        answer = yield self.lookup_as(ALICE, "bus;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        os.chown(bus, 0, 0)
        os.unlink(bus)
        answer = yield self.lookup_as(ALICE, "bus;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})

    @inlineCallbacks
    def test_hardLinksOfRootsLinksNotFollowed(self) -> Any:
        """
        Root's symbolic link is followed by its one name only: a hard link
        to it (a user may make one where fs.protected_hardlinks is 0; here
        root does) in RUNDIR is refused, as a user's own link is.
        """
        yield self.start()
        bus, factory = self.public_socket()
        link = os.path.join(os.path.dirname(bus), "link")
        os.symlink(bus, link)
        os.link(link, self.at("bus"), follow_symlinks=False)
        yield self.assertRefused(
            ALICE, "bus;", "a symbolic link of uid 0 with 2 names (hard links)"
        )
        self.assertEqual(factory.connections, 0)
        os.unlink(link)  # one name: root's link, followed
        answer = yield self.lookup_as(ALICE, "bus;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})

    @inlineCallbacks
    def test_grantReachesNoHardLink(self) -> Any:
        """
        A grant gives the service's socket in RUNDIR, not another socket a
        member hard-linked at its name first (root's private one here).
        """
        yield self.start(grants=["bus *"])
        path, factory = self.private_socket()
        os.link(path, self.at("bus"))
        yield self.assertRefused(ALICE, "bus;", "a socket of uid 0 with 2 names")
        self.assertEqual(factory.connections, 0)
        os.unlink(path)  # one name: the admin's service, granted
        answer = yield self.lookup_as(ALICE, "bus;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})

    @inlineCallbacks
    def test_grantFollowsNoUsersLinkOnTheWay(self) -> Any:
        """
        The admin routes a service to a socket in a directory that a user
        owns, and grants it: her symbolic link on the way (a directory of
        hers swapped for a link to one of root's) is not followed, or every
        grant holder, her included, would reach root's socket of that
        name, connected as root.  Root's own link on the way is followed.
        """
        home = short_rundir(self, "ipcd-home-")
        os.chown(home, ALICE.uid, ALICE.gid)
        app = os.path.join(home, "app")
        yield self.start(grants=["app *"], routes={"app": f"unix://{app}/root.sock"})
        path, factory = self.private_socket()
        os.symlink(os.path.dirname(path), app)
        os.lchown(app, ALICE.uid, ALICE.gid)
        # Her own walk stops at her home (no x, her choice): the grant's
        # walk would be the one to meet her link (the log says so; she is
        # told what a walk past her own stop tells: _past_her_search).
        os.chmod(home, 0o600)
        reply = yield self.assertRefused(ALICE, "app;")
        self.assertEqual(reply, _past_her_search(ALICE, "app", f"{app}/root.sock"))
        self.assertIn(
            f"{app}/root.sock: a symbolic link of uid 61001 on the way",
            self.log.events[-1]["outcome"],
        )
        self.assertEqual(factory.connections, 0)
        os.lchown(app, 0, 0)
        answer = yield self.lookup_as(ALICE, "app;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        self.assertEqual(self.log.events[-1]["access"], "granted by grant 1 (app *)")

    @inlineCallbacks
    def test_usersLinkRefusedAsTheClientsLookup(self) -> Any:
        """
        A client's own walk meets a user's link on the admin's route: the
        refusal says it is the client's lookup that follows only root's
        (or ipcd's) links.
        """
        path, factory = self.public_socket()
        route = _users_link_on_the_way(self, path)
        yield self.start(routes={"app": f"unix://{route}"})
        answer = yield self.lookup_as(ALICE, "app;")
        self.assertEqual(answer["reply"], _users_link(route, "a client's lookup"))
        self.assertEqual(factory.connections, 0)

    @inlineCallbacks
    def test_usersLinkRefusedAsTheGrant(self) -> Any:
        """
        A grant's walk (no permission check) meets a user's link: the
        refusal in the log says it is the grant that follows only root's
        links (it said "a client's lookup", which stopped at Alice's home:
        Bob may not search it).  Bob is told no more than that his own
        walk stopped and the grant's was refused past it: not her link,
        nor her uid.
        """
        path, factory = self.private_socket()
        route = _users_link_on_the_way(self, path)
        os.chmod(os.path.dirname(os.path.dirname(route)), 0o700)
        yield self.start(grants=["app *"], routes={"app": f"unix://{route}"})
        answer = yield self.lookup_as(BOB, "app;")
        self.assertEqual(answer["reply"], _past_her_search(BOB, "app", route))
        self.assertEqual(
            "ne " + self.log.events[-1]["outcome"], _users_link(route, "a grant")
        )
        self.assertEqual(factory.connections, 0)

    @inlineCallbacks
    def test_grantsWalkProbesNothingPastTheClientsSearch(self) -> Any:
        """
        Bob, granted a service the admin routes into Alice's home (0700:
        he may not search it), cannot probe what she keeps there through
        the grant: her link on the way, her link or a socket of hers with a
        second name as the last component, a file, a directory, nothing
        at all are told him alike, with no uid, and only the log says which
        (the refusal named her link's uid 61001, and the socket's uid and
        names).  Her socket there, as routed, is reached.
        """
        home = short_rundir(self, "ipcd-home-")
        os.chown(home, ALICE.uid, ALICE.gid)
        os.chmod(home, 0o700)
        way = os.path.join(home, "way")
        there = os.path.join(way, "app")
        yield self.start(grants=["app *"], routes={"app": f"unix://{there}"})
        elsewhere, factory = self.public_socket()
        own = os.path.join(home, "own.sock")
        self.serve(own)
        os.chown(own, ALICE.uid, ALICE.gid)

        def hers(make: Any, *args: Any) -> Any:
            def plant() -> None:
                os.mkdir(way)
                make(*args)
                os.lchown(args[-1], ALICE.uid, ALICE.gid)

            return plant

        def link_on_the_way() -> None:
            os.symlink(os.path.dirname(elsewhere), way)
            os.lchown(way, ALICE.uid, ALICE.gid)

        plants = [
            (link_on_the_way, f"{there}: a symbolic link of uid 61001 on the way"),
            (hers(os.symlink, elsewhere, there), f"{there} is a symbolic link;"),
            (hers(os.link, own, there), f"{there}: a socket of uid 61001 with 2"),
            (hers(os.mknod, there), f"{there} is not a socket"),
            (hers(os.mkdir, there), f"{there} is not a socket"),
            (hers(lambda path: None, way), f"{there} does not exist"),
            (lambda: None, f"{there} does not exist"),
        ]
        told = _past_her_search(BOB, "app", there)
        for plant, logged in plants:
            if os.path.islink(way):
                os.unlink(way)
            elif os.path.isdir(way):
                subprocess.run(["rm", "-rf", way], check=True)
            plant()
            answer = yield self.lookup_as(BOB, "app;")
            self.assertEqual(answer, {"reply": told, "fds": 0}, logged)
            self.assertIn(logged, self.log.events[-1]["outcome"])
        self.assertEqual(factory.connections, 0)
        os.mkdir(way)
        served = self.serve(there)
        os.chown(there, ALICE.uid, ALICE.gid)
        answer = yield self.lookup_as(BOB, "app;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        self.assertEqual(served.connections, 1)

    @inlineCallbacks
    def test_adminRedirectGrantsNothing(self) -> Any:
        yield self.start(redirects={"x": "secret"})
        yield self.assertRefused(ALICE, "x;", "permission denied")
        self.assertEqual(self.secret.connections, 0)

    @inlineCallbacks
    def test_ownSocketsNeverTargets(self) -> Any:
        """Not for a member, not for root, not by name, route or link."""
        yield self.start()
        # A link to ipc, which Alice may connect to herself: still refused.
        os.symlink("ipc", self.at("ctl"))
        root = Credentials(0, 0)
        for who in (ALICE, root):
            for name in ("ipcd-control", "ipc", "tcp"):
                for payload in (f"{name};", f"x;x unix://{name}"):
                    yield self.assertRefused(
                        who, payload, f"'{name}' is ipcd's own socket"
                    )
            yield self.assertRefused(who, "ctl;", "is ipcd's own socket")
        self.assertEqual(self.counters["connected"], 0)

    @inlineCallbacks
    def test_grant(self) -> Any:
        """An explicit grant lets Alice through, and the log names it."""
        yield self.start(grants=["secret uid:61001", "evil *"])
        answer = yield self.lookup_as(ALICE, "secret;")
        self.assertEqual(answer, {"reply": "ok", "fds": 1})
        self.assertEqual(
            self.log.events[-1]["access"], "granted by grant 1 (secret uid:61001)"
        )
        self.assertIn("granted by grant 1", formatEvent(self.log.events[-1]))
        # Only to whom it names...
        yield self.assertRefused(CAROL, "secret;", "permission denied")
        # ...and never through a link someone planted in RUNDIR (it leads
        # past a directory she may not search: the log says which).
        yield self.assertRefused(ALICE, "evil;", "a grant covers it, but")
        self.assertIn("evil is a symbolic link", self.log.events[-1]["outcome"])
        self.assertEqual(self.hidden.connections, 0)
        self.assertEqual(self.secret.connections, 1)

    @inlineCallbacks
    def test_grantNeverReachesOwnSockets(self) -> Any:
        yield self.start(grants=["* *"])
        for name in ("ipcd-control", "ipc", "tcp"):
            yield self.assertRefused(ALICE, f"{name};", "ipcd's own socket")

    @inlineCallbacks
    def test_disabledDaemonKeepsItsName(self) -> Any:
        """
        A protocol daemon that is registered but not running (udpd, off by
        default) still owns its name: a lookup for it is refused as ipcd's
        own, not as missing, so a socket somebody plants there later is
        never a target either.
        """
        yield self.start(grants=["* *"])
        self.assertFalse(os.path.exists(self.at("udp")))
        self.assertIn("udp", self.service.broker.own_names())
        yield self.assertRefused(ALICE, "udp;", "'udp' is ipcd's own socket")

    @inlineCallbacks
    def test_everySchemeSocketOwn(self) -> Any:
        """
        websocketd listens on C{RUNDIR/ws} and C{RUNDIR/wss}: neither is a
        target, for root either, by name or by a client's route, and
        C{ipcd status} lists neither under C{inbound:} (C{wss}, a scheme
        websocketd serves besides its own, was handed over).
        """
        yield self.start(
            websocketd={"listen": "tcp:0:interface=127.0.0.1"}, rules=["allow in *"]
        )
        for name in ("ws", "wss"):
            self.assertTrue(accepts(self.at(name)), name)
            for payload in (f"{name};", f"x;x unix://{name}"):
                yield self.assertRefused(
                    Credentials(0, 0), payload, f"'{name}' is ipcd's own socket"
                )
        reach = inbound_reach(
            self.service.broker.config, self.service.broker.own_names()
        )
        self.assertEqual([n for n in ("ws", "wss") if n in reach], [])
        self.assertEqual(self.counters["connected"], 0)


def _private_socket(case: SynchronousTestCase) -> tuple[str, Factory]:
    """Root's socket (0600) outside RUNDIR, served: path, factory."""
    path = os.path.join(short_rundir(case, "ipcd-private-"), "root.sock")
    factory = counted_pong(case, path)
    os.chmod(path, 0o600)
    return path, factory


def _users_link(route: str, whose: str) -> str:
    """The refusal of C{route} through Alice's link, by C{whose} walk."""
    return (
        f"ne {route}: a symbolic link of uid {ALICE.uid} on the way; {whose} "
        "follows only root's (or ipcd's) links"
    )


def _past_her_search(who: Credentials, service: str, path: str) -> str:
    """
    The refusal C{who} is told of C{service} at C{path} when its own walk
    stopped at a directory it may not search and a grant's walk past it
    was refused: the same whatever stopped the grant's.
    """
    return (
        f"ne service {service!r}: permission denied: uid {who.uid} may not "
        f"connect to {path}; a grant covers it, but its walk was refused past "
        "a directory the client may not search (ipcd's log says why)"
    )


def _users_link_on_the_way(case: SynchronousTestCase, path: str) -> str:
    """
    Alice's link to the directory of socket C{path}, in her home (0755):
    the path to the socket through it.
    """
    needs_root()
    home = short_rundir(case, "ipcd-home-")
    os.chmod(home, 0o755)
    os.chown(home, ALICE.uid, ALICE.gid)
    link = os.path.join(home, "app")
    os.symlink(os.path.dirname(path), link)
    os.lchown(link, ALICE.uid, ALICE.gid)
    return os.path.join(link, os.path.basename(path))


class RemoteOwnSocketsTests(TestCase):
    """Under C{allow in *}, remote peers still never reach ipcd's sockets."""

    def ask(self, port: int, name: bytes) -> Any:
        def request() -> bytes:
            with tcp_connect(port) as sock:
                sock.sendall(name)
                return recv_upto(sock, 4096)

        return deferToThread(request)

    @inlineCallbacks
    def test_ownSocketsAndLinksRefused(self) -> Any:
        host = yield start_host(self, ["allow in *"])
        # A glob reaches only what others may connect to (pong, here).
        os.chmod(host.rundir, 0o755)
        os.chmod(os.path.join(host.rundir, "pong"), 0o666)
        os.symlink("ipcd-control", os.path.join(host.rundir, "ctl"))
        os.symlink("pong", os.path.join(host.rundir, "alias"))
        lines = logged_lines(self)
        for name in ("ipcd-control", "tcp", "ipc"):
            answer = yield self.ask(host.port, name.encode())
            self.assertEqual(answer, b"ne refused")  # (the peer is told no more)
            assert_logged(self, lines, f"'{name}' is ipcd's own socket")
        for name in (b"ctl", b"alias"):
            answer = yield self.ask(host.port, name)
            # Past the glob, with no grant: as for a name with nothing there.
            self.assertEqual(answer, b"ne no such service")
            assert_logged(self, lines, f"{name.decode()} is a symbolic link")
        self.assertEqual(host.broker.counters["connected"], 0)

        # pong itself is served.
        answer = yield deferToThread(bounce_through, host.port, b"pong")
        self.assertEqual(answer, b"\0\0\0\x09bounce me")

    @inlineCallbacks
    def test_exactRuleReachesNoHardLink(self) -> Any:
        """
        A rule naming a service lets remote peers reach its socket in
        RUNDIR, not another socket a member hard-linked at its name first;
        and C{ipcd status} says so.
        """
        host = yield start_host(self, ["allow in bus"])
        path, factory = _private_socket(self)
        bus = os.path.join(host.rundir, "bus")
        os.link(path, bus)
        lines = logged_lines(self)
        answer = yield self.ask(host.port, b"bus")
        self.assertEqual(answer, b"ne refused")
        assert_logged(self, lines, "a socket of uid 0 with 2 names")
        self.assertEqual(factory.connections, 0)
        self.assertEqual(
            status_report(host.broker)["inbound"]["bus"],
            f"not reachable: {bus}: a socket of uid 0 with 2 names (hard links); "
            "a lookup reaches another user's socket only by its one name",
        )

    @inlineCallbacks
    def test_exactRuleFollowsNoUsersLinkOnTheWay(self) -> Any:
        """
        The same for a remote peer let in by a rule naming the service:
        a user's link on the admin's route is not followed to root's
        socket.
        """
        needs_root()
        home = short_rundir(self, "ipcd-home-")
        os.chmod(home, 0o755)
        os.chown(home, ALICE.uid, ALICE.gid)
        app = os.path.join(home, "app")
        host = yield start_host(
            self, ["allow in app"], routes={"app": f"unix://{app}/root.sock"}
        )
        path, factory = _private_socket(self)
        os.symlink(os.path.dirname(path), app)
        os.lchown(app, ALICE.uid, ALICE.gid)
        lines = logged_lines(self)
        answer = yield self.ask(host.port, b"app")
        self.assertEqual(answer, b"ne refused")
        assert_logged(
            self,
            lines,
            f"{app}/root.sock: a symbolic link of uid 61001 on the way; a "
            "remote peer's request follows only root's (or ipcd's) links",
        )
        self.assertEqual(factory.connections, 0)

    @inlineCallbacks
    def test_statusSaysUsersLinkOnTheWay(self) -> Any:
        """
        C{ipcd status} says what the broker does with a user's link on the
        way to root's socket: refused for a rule naming the service and for
        a grant (it said "reachable: rule 1 names it" and "reachable: grant
        1"); with root's own link in its place, both are reachable.
        """
        needs_root()
        home = short_rundir(self, "ipcd-home-")
        os.chown(home, ALICE.uid, ALICE.gid)
        app = os.path.join(home, "app")
        routes = {name: f"unix://{app}/root.sock" for name in ("app", "granted")}
        host = yield start_host(
            self,
            ["allow in app", "allow in *"],
            routes=routes,
            grants=["granted *"],
        )
        path, factory = _private_socket(self)
        os.symlink(os.path.dirname(path), app)
        os.lchown(app, ALICE.uid, ALICE.gid)
        # Others may not search her home: the glob's walk stops there, and
        # the grant's (no permission check) is the one to meet her link.
        os.chmod(home, 0o700)
        refused = {
            name: f"{app}/root.sock: a symbolic link of uid 61001 on the way; "
            f"{whose} follows only root's (or ipcd's) links"
            for name, whose in (
                ("app", "a remote peer's request"),
                ("granted", "a grant"),
            )
        }
        lines = logged_lines(self)
        for name in ("app", "granted"):
            answer = yield self.ask(host.port, name.encode())
            self.assertEqual(answer, b"ne refused")
            assert_logged(self, lines, refused[name])
        inbound = status_report(host.broker)["inbound"]
        self.assertEqual(
            (inbound["app"], inbound["granted"]),
            (
                f"not reachable: {refused['app']}",
                f"not reachable: {refused['granted']}",
            ),
        )
        self.assertEqual(factory.connections, 0)
        os.lchown(app, 0, 0)
        inbound = status_report(host.broker)["inbound"]
        self.assertEqual(
            (inbound["app"], inbound["granted"]),
            ("reachable: rule 1 names it", "reachable: grant 1 (granted *)"),
        )
        for name in (b"app", b"granted"):
            answer = yield deferToThread(bounce_through, host.port, name)
            self.assertEqual(answer, b"\0\0\0\x09bounce me")
        # A socket that is not there is not reached by naming it either.
        os.unlink(path)
        self.assertEqual(
            status_report(host.broker)["inbound"]["app"],
            f"not reachable: {app}/root.sock does not exist",
        )

    @inlineCallbacks
    def test_usersLinkRefusedAsTheRemotePeersRequest(self) -> Any:
        """
        A remote peer's walk meets a user's link on the admin's route,
        whether a glob let it in (its walk as others) or a rule naming the
        service (no permission check): the refusal says it is the remote
        peer's request that follows only root's links (it said "a
        client's lookup") in the decision line, and C{ipcd status} says the same.
        """
        public = short_rundir(self, "ipcd-public-")
        os.chmod(public, 0o755)
        path = os.path.join(public, "bus.sock")
        factory = counted_pong(self, path)
        os.chmod(path, 0o666)
        route = _users_link_on_the_way(self, path)
        host = yield start_host(
            self,
            ["allow in named", "allow in *"],
            routes={name: f"unix://{route}" for name in ("named", "globbed")},
        )
        refused = _users_link(route, "a remote peer's request").removeprefix("ne ")
        inbound = status_report(host.broker)["inbound"]
        lines = logged_lines(self)
        # (The peer is told no more; past the glob, with no grant, as for
        # a name with nothing there.)
        told = {"named": b"ne refused", "globbed": b"ne no such service"}
        for name in ("named", "globbed"):
            answer = yield self.ask(host.port, name.encode())
            self.assertEqual(answer, told[name])
            assert_logged(self, lines, refused)
            self.assertEqual(inbound[name], f"not reachable: {refused}")
        self.assertEqual(factory.connections, 0)

    @inlineCallbacks
    def test_hardLinksRefusedAndSaidSo(self) -> Any:
        """
        A hard link to one of ipcd's sockets, under a rule naming it, is
        refused as ipcd's own; and C{ipcd status} says it is not reachable
        (it said the rule let peers reach it).
        """
        names = ("ctl", "tcpd", "lookups")
        host = yield start_host(self, [f"allow in {name}" for name in names])
        for name, own in zip(names, ("ipcd-control", "tcp", "ipc"), strict=True):
            os.link(os.path.join(host.rundir, own), os.path.join(host.rundir, name))
        lines = logged_lines(self)
        for name in names:
            answer = yield self.ask(host.port, name.encode())
            self.assertEqual(answer, b"ne refused")
            assert_logged(self, lines, f"{name} is ipcd's own socket")
        self.assertEqual(host.broker.counters["connected"], 0)
        reach = status_report(host.broker)["inbound"]
        for name in names:
            path = os.path.join(host.rundir, name)
            self.assertEqual(reach[name], f"not reachable: {path} is ipcd's own socket")


class EveryNameDecidedTests(TestCase):
    """Each name a lookup involves is decided on its own; all must allow."""

    @inlineCallbacks
    def test_localRuleNotWalkedAround(self) -> Any:
        rundir = short_rundir(self)
        yield start_ipcd(self, make_config(rundir, rules=["deny local pong *"]))
        for payload in (b"pong;", b"x;x unix://pong", b"x;x unix:///pong"):
            reply = yield deferToThread(lookup, rundir, payload)
            self.assertEqual(reply.fds, [])
            self.assertIn(b"denied by rule 1 (deny local pong *)", reply.data)

    @inlineCallbacks
    def test_outNeedsEveryName(self) -> Any:
        """C{allow out pong} does not let C{pong;pong tcp://H:P/secret} by."""
        rundir = short_rundir(self)
        yield start_ipcd(
            self,
            make_config(rundir, rules=["allow out pong", "deny out * *"]),
        )
        reply = yield deferToThread(
            lookup, rundir, b"pong;pong tcp://127.0.0.1:9/secret"
        )
        self.assertEqual(reply.fds, [])
        self.assertIn(b"denied by rule 2 (deny out * *) for 'secret'", reply.data)
