"""Security: who may reach the daemon, and what it will load.

Unix socket modes and ownership (checked with a real unprivileged user when
the tests run as root), TCP loopback by default, TLS and mutual TLS with
certificates generated here, reflection switched off, no pickle anywhere, and
model files checked by sha256 before onnxruntime sees them (the flipped-byte
refusal itself is ``tests/bwpredd/test_engine.py::TestLoad::
test_flipped_byte_refused``; here we check that no session is built first).
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import bwpredd.modeldir
from bwpredd.client import Client, channel_for, pb
from bwpredd.config import Config, ConfigError, parse_listen
from bwpredd.errors import ModelError
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model
from bwpredd.persist import SNAPSHOT_NAME
from bwpredd.server import StartupError
from bwpredd.servicer import SERVICE_NAME
from tests.helpers import daemon_process, free_port, running_server, sample, wait_for_health

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
IS_ROOT = os.geteuid() == 0


# -- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files of two independent CAs and the certificates they signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path
    expired_client_cert: Path
    expired_client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    expired: bool = False,
) -> x509.Certificate:
    """A certificate for ``subject`` signed by ``issuer`` (self-signed when None)."""
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=30), now - dt.timedelta(days=1))
        if expired
        else (now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    )
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signer = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any = None) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("bwpredd test CA", ca_key, None, ca=True)
    other = _cert("some other CA", other_key, None, ca=True)
    server_key, client_key, oclient_key, expired_key = _key(), _key(), _key(), _key()
    _write(d, "ca", ca)
    _write(d, "other-ca", other)
    _write(d, "server", _cert("localhost", server_key, (ca, ca_key), server=True), server_key)
    _write(d, "client", _cert("worker-1", client_key, (ca, ca_key)), client_key)
    _write(d, "other-client", _cert("intruder", oclient_key, (other, other_key)), oclient_key)
    _write(d, "expired", _cert("worker-old", expired_key, (ca, ca_key), expired=True), expired_key)
    return Pki(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
        other_client_cert=d / "other-client.pem",
        other_client_key=d / "other-client.key",
        expired_client_cert=d / "expired.pem",
        expired_client_key=d / "expired.key",
    )


def _refused(client: Client) -> grpc.StatusCode:
    """The status of a Health check that is expected to fail."""
    with pytest.raises(grpc.RpcError) as err:
        client.health()
    client.close()
    return err.value.code()


# -- unix socket --------------------------------------------------------------------


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A directory under /tmp that any user may traverse (pytest's tmp_path is
    0700 and would hide the socket from another user for the wrong reason)."""
    d = Path(tempfile.mkdtemp(prefix="bwpredd-sec-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


_CONNECT_AS = """
import os, socket, sys
os.setgroups([])
os.setgid({uid})
os.setuid({uid})
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    sys.exit(13)
except OSError as exc:
    print(exc)
    sys.exit(1)
sys.exit(0)
"""


def connect_as(uid: int, path: Path) -> int:
    """Exit status of a process running as ``uid`` that connects to ``path``:
    0 connected, 13 permission denied, 1 any other failure."""
    code = _CONNECT_AS.format(uid=uid)
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], timeout=30, check=False
    ).returncode


class TestUnixSocket:
    """The socket is 0660 inside a 0750 directory the service owns."""

    def test_modes_and_owner(self, tmp_path: Path) -> None:
        """Socket 0660 and directory 0750, both owned by the daemon's user and group."""
        with running_server(tmp_path) as (server, client):
            assert client.health() == "SERVING"
            path = Path(server.address.removeprefix("unix:"))
            st, dst = path.stat(), path.parent.stat()
            assert st.st_mode & 0o777 == 0o660 and dst.st_mode & 0o777 == 0o750
            assert st.st_uid == dst.st_uid == os.geteuid()
            assert dst.st_gid == os.getegid()

    @pytest.mark.skipif(not IS_ROOT, reason="needs root to act as another user")
    def test_other_user_refused(self, open_tmp: Path) -> None:
        """A user outside the service's group cannot connect; widening the modes
        by hand lets the same user in, so the refusal is the modes' doing."""
        with running_server(open_tmp) as (server, client):
            path = Path(server.address.removeprefix("unix:"))
            assert connect_as(NOBODY, path) == 13
            path.parent.chmod(0o755)  # the directory alone: the socket's 0660 still refuses
            assert connect_as(NOBODY, path) == 13
            path.chmod(0o666)
            assert connect_as(NOBODY, path) == 0
            assert client.health() == "SERVING"

    @pytest.mark.parametrize("owner", ["self-0777", "self-0770", "other-user"])
    def test_preexisting_directory_refused_untouched(self, open_tmp: Path, owner: str) -> None:
        """An existing socket directory that others could write (and that is not
        sticky), or that another user owns, stops start-up naming it; its mode
        and owner are left exactly as they were."""
        run = open_tmp / "run"
        run.mkdir()
        run.chmod(0o770 if owner == "self-0770" else 0o777)
        if owner == "other-user":
            if not IS_ROOT:
                pytest.skip("needs root to chown")
            os.chown(run, NOBODY, NOBODY)
            run.chmod(0o755)
        before = run.stat()
        with pytest.raises(StartupError, match=f"^listen: .*{run}"), running_server(open_tmp):
            pass
        after = run.stat()
        assert (after.st_mode, after.st_uid, after.st_gid) == (
            before.st_mode,
            before.st_uid,
            before.st_gid,
        )

    def test_stale_socket_replaced_and_file_refused(self, tmp_path: Path) -> None:
        """A stale socket file is replaced; a regular file at the socket path stops start-up."""
        run = tmp_path / "run"
        run.mkdir(mode=0o750)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(run / "bwpredd.sock"))
        stale.close()
        with running_server(tmp_path) as (_, client):
            assert client.health() == "SERVING"
        (run / "bwpredd.sock").write_text("not a socket")
        with pytest.raises(StartupError, match="not a socket"), running_server(tmp_path):
            pass


def _log_events(out: str) -> list[dict[str, Any]]:
    """The JSON log lines of a daemon's output."""
    events = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return [e for e in events if isinstance(e, dict) and "event" in e]


class TestSharedSocketDirectory:
    """A socket in a shared sticky directory (/tmp, /dev/shm) leaves the
    directory alone and is guarded by its own mode (issue 14, item 3)."""

    def test_sticky_directory_left_alone(self, open_tmp: Path) -> None:
        """In a 1777 directory the daemon serves with its socket at 0660, the
        directory keeps mode 1777, and one warning line says why that is weak."""
        shared = open_tmp / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        sock = shared / "bwpredd.sock"
        env = {"BWPREDD_LISTEN": f"unix:{sock}", "BWPREDD_LOG_FORMAT": "json"}
        with daemon_process([], env=env) as proc:
            wait_for_health(f"unix:{sock}").close()
            assert shared.stat().st_mode & 0o7777 == 0o1777
            assert sock.stat().st_mode & 0o777 == 0o660
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0
        warnings = [e for e in _log_events(out) if e["event"] == "socket_dir_shared"]
        assert len(warnings) == 1 and warnings[0]["level"] == "warning"
        assert warnings[0]["path"] == str(shared)

    @pytest.mark.skipif(not IS_ROOT, reason="needs root to make another user's socket")
    def test_other_users_socket_kept(self, open_tmp: Path) -> None:
        """In a shared directory a socket of another user at the listen path is
        neither removed nor replaced: start-up stops naming it."""
        shared = open_tmp / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        sock = shared / "bwpredd.sock"
        theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.bind(str(sock))
        theirs.close()
        os.chown(sock, NOBODY, NOBODY)
        with (
            pytest.raises(StartupError, match=f"^listen: {sock}.*uid {NOBODY}"),
            running_server(open_tmp, listen=f"unix:{sock}"),
        ):
            pass
        assert sock.is_socket() and sock.stat().st_uid == NOBODY
        assert shared.stat().st_mode & 0o7777 == 0o1777


OTHER_UID = 12345


class TestSocketPath:
    """The socket's path is walked like the state directory's: no link
    another user placed is followed and no directory on the way is one they
    could swap; the socket is bound at the real path the walk resolved and
    removed at stop only while its name still holds it."""

    @pytest.mark.skipif(not IS_ROOT, reason="needs root to make another user's link")
    @pytest.mark.parametrize("where", ["above", "at"])
    def test_foreign_link_on_the_way_refused(self, open_tmp: Path, where: str) -> None:
        """A symlink of another user above the socket's directory (or as the
        directory) stops start-up naming the link and its owner, and nothing
        is created, bound or removed where it points."""
        victim = open_tmp / "victim"
        victim.mkdir()
        (victim / "bwpredd.sock").write_text("the victim's file")
        link = open_tmp / "bwpredd"
        link.symlink_to(victim)
        os.lchown(link, OTHER_UID, OTHER_UID)
        sock = link / "x" / "bwpredd.sock" if where == "above" else link / "bwpredd.sock"
        with (
            pytest.raises(
                StartupError,
                match=f"^listen: socket directory {sock.parent}: {link} is a symlink owned "
                f"by uid {OTHER_UID}",
            ),
            running_server(open_tmp, listen=f"unix:{sock}"),
        ):
            pass
        assert sorted(p.name for p in victim.iterdir()) == ["bwpredd.sock"]
        assert (victim / "bwpredd.sock").read_text() == "the victim's file"

    @pytest.mark.skipif(not IS_ROOT, reason="needs root to make another user's link")
    def test_foreign_link_exits_3(self, open_tmp: Path) -> None:
        """The daemon as a process exits 3 with the line naming the link."""
        victim = open_tmp / "victim"
        victim.mkdir()
        link = open_tmp / "bwpredd"
        link.symlink_to(victim)
        os.lchown(link, OTHER_UID, OTHER_UID)
        env = {"BWPREDD_LISTEN": f"unix:{link}/x/bwpredd.sock"}
        with daemon_process([], env=env) as proc:
            out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 3, out
        assert f"{link} is a symlink owned by uid {OTHER_UID}" in out
        assert list(victim.iterdir()) == []

    def test_own_link_followed_and_bound_at_real_path(self, open_tmp: Path) -> None:
        """A link of the daemon's own user (or root) is followed: the socket
        is bound, and reported, at the real path, and reachable through the
        link."""
        real = open_tmp / "real"
        real.mkdir(mode=0o755)
        link = open_tmp / "link"
        link.symlink_to(real)
        with running_server(open_tmp, listen=f"unix:{link}/run/bwpredd.sock") as (server, client):
            assert server.address == f"unix:{real}/run/bwpredd.sock"
            assert (real / "run" / "bwpredd.sock").is_socket()
            assert client.health() == "SERVING"
            via_link = Client(channel_for(f"unix:{link}/run/bwpredd.sock"), timeout=10)
            assert via_link.health() == "SERVING"
            via_link.close()

    @pytest.mark.parametrize("kind", ["other-user", "0777", "0770"])
    def test_swappable_directory_on_the_way_refused(self, open_tmp: Path, kind: str) -> None:
        """A directory above the socket's that another user owns, or that
        others may write and is not sticky, stops start-up naming it and why;
        nothing is created in it and its mode is left alone."""
        above = open_tmp / "above"
        above.mkdir()
        if kind == "other-user":
            if not IS_ROOT:
                pytest.skip("needs root to chown")
            os.chown(above, NOBODY, NOBODY)
            above.chmod(0o755)
            why = f"owned by uid {NOBODY}"
        else:
            above.chmod(int(kind, 8))
            why = f"writable by group or others \\(mode {kind}\\)"
        before = above.stat()
        sock = above / "run" / "bwpredd.sock"
        with (
            pytest.raises(
                StartupError, match=f"^listen: socket directory {sock.parent}: {above} is {why}"
            ),
            running_server(open_tmp, listen=f"unix:{sock}"),
        ):
            pass
        assert list(above.iterdir()) == []
        after = above.stat()
        assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)

    @pytest.mark.parametrize("kind", ["file", "link"])
    def test_name_taken_before_stop_not_removed(self, tmp_path: Path, kind: str) -> None:
        """At stop the daemon removes the socket's name only while it still
        holds the socket it bound: a file (or a link) put there since is
        left in place, and a link's target untouched."""
        target = tmp_path / "target"
        target.write_text("not the daemon's")
        with running_server(tmp_path) as (server, client):
            assert client.health() == "SERVING"
            sock = Path(server.address.removeprefix("unix:"))
            sock.unlink()
            if kind == "file":
                sock.write_text("not the daemon's")
            else:
                sock.symlink_to(target)
        assert sock.is_symlink() == (kind == "link")
        assert sock.read_text() == "not the daemon's"
        assert target.read_text() == "not the daemon's"


# -- TCP ------------------------------------------------------------------------------


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:
                    found.append(addr)
    return found


_LOOPBACK_HEX = {
    "0100007F",  # 127.0.0.1
    "00000000000000000000000001000000",  # ::1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
}


class TestTcp:
    """TCP is opt-in, loopback unless TLS (or an explicit override) is configured."""

    def test_default_is_unix(self) -> None:
        """With nothing configured the daemon listens on a unix socket, not TCP."""
        assert parse_listen(Config().listen)[0] == "unix"
        assert parse_listen(Config.load(env={}).listen)[0] == "unix"

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
    def test_loopback_only(self, tmp_path: Path, host: str) -> None:
        """A TCP listener on a loopback name binds loopback addresses only."""
        with running_server(tmp_path, listen=f"{host}:0", allow_insecure_tcp=True) as (
            server,
            client,
        ):
            port = int(server.address.rsplit(":", 1)[1])
            addrs = _listening(port)
            assert addrs and set(addrs) <= _LOOPBACK_HEX
            assert client.health() == "SERVING"

    @pytest.mark.parametrize(
        "listen",
        ["0.0.0.0:50051", "[::]:50051", "192.0.2.10:50051", "node1.example:50051", "0:50051"],
    )
    def test_non_loopback_needs_tls(self, listen: str) -> None:
        """A non-loopback TCP address without TLS is refused by the config
        (flags and environment alike), naming listen and the remedy."""
        with pytest.raises(ConfigError, match=r"^listen: .*tls_cert"):
            Config(listen=listen)
        with pytest.raises(ConfigError, match=r"^listen:"):
            Config.load(env={"BWPREDD_LISTEN": listen})
        assert Config(listen=listen, allow_insecure_tcp=True).listen == listen
        assert Config(listen=listen, tls_cert="c.pem", tls_key="k.pem").listen == listen

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.2"])
    def test_plaintext_loopback_needs_opt_in(self, host: str) -> None:
        """TCP without TLS, loopback included, needs allow_insecure_tcp: any
        local user could reach it, bypassing the socket's group (issue 14, item 4)."""
        with pytest.raises(ConfigError, match=r"^listen: .*allow_insecure_tcp"):
            Config(listen=f"{host}:50051")
        with pytest.raises(ConfigError, match=r"^listen: .*allow_insecure_tcp"):
            Config.load(env={"BWPREDD_LISTEN": f"{host}:50051"})
        assert Config(listen=f"{host}:50051", allow_insecure_tcp=True).allow_insecure_tcp

    def test_insecure_tcp_warned_at_startup(self, tmp_path: Path) -> None:
        """With allow_insecure_tcp a plaintext TCP daemon serves and says so in
        one warning line naming the address."""
        port = free_port()
        env = {
            "BWPREDD_LISTEN": f"127.0.0.1:{port}",
            "BWPREDD_ALLOW_INSECURE_TCP": "true",
            "BWPREDD_LOG_FORMAT": "json",
        }
        with daemon_process([], env=env) as proc:
            wait_for_health(f"127.0.0.1:{port}").close()
            proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=30)[0].decode()
        warnings = [e for e in _log_events(out) if e["event"] == "insecure_tcp"]
        assert len(warnings) == 1 and warnings[0]["level"] == "warning"
        assert warnings[0]["listen"] == f"127.0.0.1:{port}"

    def test_tls_settings_checked(self) -> None:
        """Half a key pair, or client auth without a client CA, is refused."""
        with pytest.raises(ConfigError, match="tls_cert, tls_key"):
            Config(listen="127.0.0.1:0", tls_cert="c.pem")
        with pytest.raises(ConfigError, match="require_client_auth"):
            Config(
                listen="127.0.0.1:0", tls_cert="c.pem", tls_key="k.pem", require_client_auth=True
            )


class TestTls:
    """TLS and mutual TLS with certificates generated in the test."""

    def test_server_tls(self, tmp_path: Path, pki: Pki) -> None:
        """A client trusting the CA talks TLS; plaintext, the wrong CA and a name
        the certificate does not carry are all refused."""
        with running_server(
            tmp_path,
            listen="127.0.0.1:0",
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
        ) as (server, _):
            target = server.address
            with Client(channel_for(target, ca=str(pki.ca)), timeout=5) as ok:
                assert ok.health() == "SERVING"
                assert ok.push([sample("tls-peer", 5.0)]).accepted == 1
            assert _refused(Client(channel_for(target), timeout=2)) == grpc.StatusCode.UNAVAILABLE
            assert (
                _refused(Client(channel_for(target, ca=str(pki.other_ca)), timeout=2))
                == grpc.StatusCode.UNAVAILABLE
            )
            wrong_name = channel_for(target, ca=str(pki.ca), server_name="evil.example")
            assert _refused(Client(wrong_name, timeout=2)) == grpc.StatusCode.UNAVAILABLE

    def test_mutual_tls(self, tmp_path: Path, pki: Pki) -> None:
        """Under mTLS a client with a certificate from the client CA gets in; no
        certificate, one from another CA, or an expired one is refused."""
        with running_server(
            tmp_path,
            listen="127.0.0.1:0",
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_client_ca=str(pki.ca),
            require_client_auth=True,
        ) as (server, _):
            target = server.address

            def client(cert: Path | None, key: Path | None) -> Client:
                channel = channel_for(
                    target,
                    ca=str(pki.ca),
                    cert=str(cert) if cert else None,
                    key=str(key) if key else None,
                )
                return Client(channel, timeout=2)

            with client(pki.client_cert, pki.client_key) as ok:
                assert ok.health() == "SERVING"
                assert ok.push([sample("mtls-peer", 5.0)]).accepted == 1
                assert ok.peer("mtls-peer").sample_count == 1
            unavailable = grpc.StatusCode.UNAVAILABLE
            assert _refused(client(None, None)) == unavailable
            assert _refused(client(pki.other_client_cert, pki.other_client_key)) == unavailable
            assert _refused(client(pki.expired_client_cert, pki.expired_client_key)) == unavailable
            with client(pki.client_cert, pki.client_key) as again:
                assert again.peer("mtls-peer").sample_count == 1

    def test_unreadable_key_stops_startup(self, tmp_path: Path, pki: Pki) -> None:
        """A TLS key that cannot be read stops start-up naming tls_key."""
        with (
            pytest.raises(StartupError, match="tls_key"),
            running_server(
                tmp_path,
                listen="127.0.0.1:0",
                tls_cert=str(pki.server_cert),
                tls_key=str(tmp_path / "missing.key"),
            ),
        ):
            pass


# -- reflection -------------------------------------------------------------------------


def _list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (resp,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    return [s.name for s in resp.list_services_response.service]


class TestReflection:
    """Server reflection can be switched off."""

    def test_on_lists_services(self, tmp_path: Path) -> None:
        """With reflection on, the API, health and reflection services are listed."""
        with running_server(tmp_path) as (_, client):
            names = _list_services(client.channel)
            assert SERVICE_NAME in names and "grpc.health.v1.Health" in names

    def test_off_removes_it(self, tmp_path: Path) -> None:
        """With reflection off, every reflection method answers UNIMPLEMENTED
        (v1alpha and v1) while the API still serves."""
        with running_server(tmp_path, reflection=False) as (_, client):
            with pytest.raises(grpc.RpcError) as err:
                _list_services(client.channel)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            raw = client.channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            )
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as err:
                list(raw(iter([request.SerializeToString()]), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert client.push([sample("r", 1.0)]).accepted == 1


# -- no pickle --------------------------------------------------------------------------

_SOURCE_DIRS = ("bwpredd", "trainer", "export", "tools", "tests")
_PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _python_files() -> list[Path]:
    files: list[Path] = []
    for d in _SOURCE_DIRS:
        if (REPO / d).is_dir():
            files += [p for p in (REPO / d).rglob("*.py") if "_proto" not in p.parts]
    return files


def _kw(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def _pickle_uses(path: Path) -> list[str]:
    """Every way ``path`` could unpickle: imports of pickling modules, np.load
    without allow_pickle=False, torch.load without weights_only=True, and
    allow_pickle=True / read_pickle / yaml.load anywhere."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[str] = []
    where = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [
                f"{where}:{node.lineno} import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in _PICKLERS
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLERS:
            out.append(f"{where}:{node.lineno} from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = (
                func.value.id
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                else ""
            )
            if (
                attr == "load"
                and owner in ("np", "numpy")
                and _kw(node, "allow_pickle") is not False
            ):
                out.append(f"{where}:{node.lineno} {owner}.load without allow_pickle=False")
            if attr == "load" and owner == "torch" and _kw(node, "weights_only") is not True:
                out.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            if attr == "load" and owner == "yaml":
                out.append(f"{where}:{node.lineno} yaml.load")
            if attr in ("read_pickle", "to_pickle"):
                out.append(f"{where}:{node.lineno} {attr}")
            if _kw(node, "allow_pickle") is True:
                out.append(f"{where}:{node.lineno} allow_pickle=True")
    return out


class Boom:
    """Unpickling this creates its marker file: proof that pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


class TestNoPickle:
    """Nothing unpickles: not the source, not the snapshot loader, not the model files."""

    def test_source_tree(self) -> None:
        """No module imports a pickler, and every np.load / torch.load refuses pickles."""
        files = _python_files()
        assert len(files) > 30
        problems = [p for f in files for p in _pickle_uses(f)]
        assert problems == []

    def test_scanner_finds_pickle(self, tmp_path: Path) -> None:
        """The scanner itself flags each pattern (so an empty report means something)."""
        bad = tmp_path / "probe.py"
        bad.write_text(
            "import pickle\nimport numpy as np\nimport torch\n"
            "np.load('x')\nnp.load('x', allow_pickle=True)\ntorch.load('m')\n"
            "np.load('x', allow_pickle=False)\ntorch.load('m', weights_only=True)\n"
        )
        found = _pickle_uses(bad)
        assert len(found) == 5, found

    def test_no_pickle_files_shipped(self) -> None:
        """The package ships no pickle-format files (.pkl, .pt, .npy, .joblib, ...)."""
        suffixes = {".pkl", ".pickle", ".pt", ".pth", ".joblib", ".npy", ".npz", ".bin"}
        shipped = [p for p in (REPO / "bwpredd").rglob("*") if p.suffix in suffixes]
        assert shipped == []

    def test_poisoned_snapshot_not_unpickled(self, tmp_path: Path) -> None:
        """A snapshot holding a pickled object is moved aside unread: the payload
        never runs and the daemon starts empty."""
        marker = tmp_path / "pwned"
        state = tmp_path / "state"
        state.mkdir()
        payload = np.empty(1, dtype=object)
        payload[0] = Boom(marker)
        with (state / SNAPSHOT_NAME).open("wb") as fh:
            np.savez(fh, peer_ids=payload, format=np.array([1]))
        with running_server(tmp_path, state_dir=str(state)) as (_, client):
            assert client.peers() == []
        assert not marker.exists()
        assert any(p.name.startswith(f"{SNAPSHOT_NAME}.corrupt-") for p in state.iterdir())


# -- model integrity ----------------------------------------------------------------------


class TestModelIntegrity:
    """Model files are checked by sha256 before onnxruntime sees them."""

    def test_no_session_before_check(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A flipped byte is refused before any session is built; an intact
        directory builds sessions from exactly the verified bytes."""
        import hashlib

        built: list[bytes] = []
        real = bwpredd.modeldir.session

        def spy(data: bytes, **options: Any) -> Any:
            built.append(data)
            return real(data, **options)

        monkeypatch.setattr(bwpredd.modeldir, "session", spy)
        d = tmp_path / "m"
        shutil.copytree(DEFAULT_MODEL_DIR, d)
        manifest = json.loads((d / "manifest.json").read_text())
        blob = bytearray((d / "allocator.onnx").read_bytes())
        blob[-10] ^= 0x01
        (d / "allocator.onnx").write_bytes(bytes(blob))
        with pytest.raises(ModelError, match="sha256 mismatch"):
            load_model(d)
        assert built == []
        shutil.copy(DEFAULT_MODEL_DIR / "allocator.onnx", d / "allocator.onnx")
        load_model(d)
        digests = {hashlib.sha256(b).hexdigest() for b in built}
        assert digests == {
            manifest["forecaster"]["sha256"],
            manifest["allocator"]["sha256"],
            manifest["horizon"]["sha256"],
        }

    def test_manifest_cannot_point_outside(self, tmp_path: Path) -> None:
        """A manifest naming a file outside the model directory is refused."""
        d = tmp_path / "m"
        shutil.copytree(DEFAULT_MODEL_DIR, d)
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["forecaster"]["file"] = "../forecaster.onnx"
        (d / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelError, match="plain file name"):
            load_model(d)

    def test_daemon_refuses_tampered_model(self, tmp_path: Path) -> None:
        """A daemon given a tampered model directory serves baselines, never the model."""
        d = tmp_path / "m"
        shutil.copytree(DEFAULT_MODEL_DIR, d)
        blob = bytearray((d / "forecaster.onnx").read_bytes())
        blob[len(blob) // 3] ^= 0x80
        (d / "forecaster.onnx").write_bytes(bytes(blob))
        with running_server(tmp_path, model_dir=str(d)) as (_, client):
            assert client.health("bwpredd.model") == "NOT_SERVING"
            client.push([sample("m", 10.0 + i) for i in range(10)])
            (fc,) = client.forecast(["m"])
            assert fc.source == pb.FORECAST_SOURCE_BASELINE_FALLBACK and fc.model_version == ""
