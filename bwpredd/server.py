"""The daemon's life cycle: start-up, main loop, shutdown.

``Server(config).run()`` -> ``serve()`` -> ``startup()``, ``main_loop()``,
``shutdown()``. Signal handlers only set flags: SIGTERM/SIGINT ask for a
graceful exit (a second SIGINT forces it), SIGHUP asks for a model reload.
Shutdown marks health NOT_SERVING, stops the gRPC server with a grace period
so calls in flight finish, then writes what the recorder holds and the
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from bwpredd.config import Config, check_record_node, parse_listen
from bwpredd.core import Core
from bwpredd.engine import Engine
from bwpredd.errors import ModelError
from bwpredd.health import NOT_SERVING, SERVING, Health
from bwpredd.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from bwpredd.logging import flush_logs, get_logger
from bwpredd.metrics import Metrics, MetricsServer
from bwpredd.modeldir import DEFAULT_MODEL_DIR, LoadedModel, load_model
from bwpredd.persist import load_snapshot, save_snapshot, set_aside
from bwpredd.recording import DIR_NAME as RECORDINGS_DIR
from bwpredd.recording import Recorder
from bwpredd.safefs import UnsafePath, open_new, private_dir, temp_name, walk_dir
from bwpredd.servicer import SERVICE_NAME, BandwidthPredictorServicer, add_to_server
from bwpredd.systemd import Notifier

__all__ = ["MODEL_HEALTH_SERVICE", "Server", "StartupError", "create_server"]

log = get_logger(__name__)
# Health "service" that is SERVING only while a verified model is loaded, so
# probes and operators can tell MODEL answers from BASELINE_FALLBACK.
MODEL_HEALTH_SERVICE = "bwpredd.model"


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


def _server_credentials(config: Config) -> grpc.ServerCredentials:
    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise StartupError(f"{what}: cannot read {path}: {exc.strerror}") from None

    key = read(config.tls_key, "tls_key")
    cert = read(config.tls_cert, "tls_cert")
    ca = read(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=config.require_client_auth
    )


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


class _SocketFile:
    """The daemon's unix socket: its directory, held open from the check on,
    the name in it, and once bound the inode, so that stopping removes the
    socket the daemon bound and nothing that took its name since.

    Args:
        dir_fd: the socket's directory, from :func:`bwpredd.safefs.walk_dir`.
        name: the socket's name in it.
        path: the socket's real path (the directory as the walk resolved it).
    """

    def __init__(self, dir_fd: int, name: str, path: Path) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.path = path
        self._inode: tuple[int, int] | None = None

    def bound(self) -> None:
        """Note the inode now at the name: the socket just bound (none
        noted, none removed, if the name is gone or not a socket)."""
        with contextlib.suppress(OSError):
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
            if stat.S_ISSOCK(st.st_mode):
                self._inode = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        """Remove the name if it is still the socket bound (never following
        a link), and close the directory."""
        try:
            if self._inode is not None:
                st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.name, dir_fd=self.dir_fd)
                else:
                    log.warning("socket_replaced", path=str(self.path), left="in place")
        except FileNotFoundError:
            pass  # grpc's stop removes a socket at the path itself
        except OSError as exc:
            log.warning("socket_not_removed", path=str(self.path), error=exc.strerror)
        finally:
            self.close()

    def close(self) -> None:
        """Close the directory (once)."""
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _prepare_socket_dir(path: Path) -> _SocketFile:
    """Create the socket's directory (mode 0750: only the service and its
    group may enter) or check the one that exists, and clear a stale socket.

    The directory is reached as :func:`bwpredd.safefs.walk_dir` reaches it:
    no symlink another user owns is followed, and no directory on the way
    may be one another user could change (theirs, or writable by group or
    others and not sticky). The socket is then bound at the real path that
    walk resolved, never at the string given.

    The mode of a directory the daemon did not create is never changed. One
    that exists must belong to the service's user or root, and either be
    writable by no one else, or be a shared sticky directory (``/tmp``),
    where no one else can remove or rename the socket but its own mode
    (``socket_mode``) is all that guards it: that is allowed, with a warning.
    Anything else is refused: whoever can write there could swap the socket.

    Returns:
        The socket's directory (open) and name; the caller closes it.
    """
    parent = path.parent
    try:
        dir_fd, real = walk_dir(parent, 0o750, whole_path=True)
    except UnsafePath as exc:
        raise StartupError(
            f"listen: socket directory {parent}: {exc.filename} is {exc.strerror}, so "
            "another user could redirect the socket; listen under directories that only "
            "root or the service can change"
        ) from None
    except NotADirectoryError:
        raise StartupError(f"listen: socket directory {parent} is not a directory") from None
    except OSError as exc:
        raise StartupError(f"listen: socket directory {parent}: {exc.strerror or exc}") from None
    sock = _SocketFile(dir_fd, path.name, real / path.name)
    try:
        _check_socket_dir(parent, os.fstat(dir_fd))
        _clear_stale_socket(path, sock)
    except BaseException:
        sock.close()
        raise
    return sock


def _check_socket_dir(parent: Path, st: os.stat_result) -> None:
    """Refuse a socket directory another user owns or could write (unless
    sticky); warn about a shared sticky one."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.geteuid(), 0):
        raise StartupError(
            f"listen: socket directory {parent} belongs to uid {st.st_uid}, not to the "
            f"service (uid {os.geteuid()}) or root"
        )
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise StartupError(
            f"listen: socket directory {parent} is writable by group or others (mode "
            f"{mode:04o}) and not sticky, so they could replace the socket; use a private "
            "directory (bwpredd creates a missing one, mode 0750) or chmod go-w it"
        )
    if mode & 0o022:
        log.warning(
            "socket_dir_shared",
            path=str(parent),
            mode=f"{mode:04o}",
            advice="others may create files beside the socket, guarded only by socket_mode; "
            "listen in a private directory",
        )


def _clear_stale_socket(path: Path, sock: _SocketFile) -> None:
    """Remove a socket of the service's user left at the name; refuse
    anything else there."""
    try:
        old = os.stat(sock.name, dir_fd=sock.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"listen: {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(old.st_mode):
        raise StartupError(f"listen: {path} exists and is not a socket")
    if old.st_uid != os.geteuid():
        raise StartupError(f"listen: {path} is a socket of uid {old.st_uid}, not replaced")
    try:
        os.unlink(sock.name, dir_fd=sock.dir_fd)
    except OSError as exc:
        raise StartupError(
            f"listen: cannot remove the stale socket {path}: {exc.strerror}"
        ) from None


def _prepare_state_dir(path: Path) -> None:
    """Check at start-up that snapshots can be written to ``path``: a
    directory (created 0700 if missing) that only the service may write, in
    which a file can be created."""
    try:
        with private_dir(path) as dir_fd:
            probe = temp_name("probe")
            open_new(probe, dir_fd).close()
            os.unlink(probe, dir_fd=dir_fd)
    except OSError as exc:
        raise StartupError(f"state_dir: {path}: {exc.strerror or exc}") from None


def create_server(
    config: Config, core: Core
) -> tuple[grpc.aio.Server, str, Health, _SocketFile | None]:
    """Build (but do not start) the gRPC server for ``core``.

    Args:
        config: listen address, TLS, limits, reflection.
        core: the domain logic to serve.

    Returns:
        ``(server, address, health_servicer, socket_file)``; for TCP port 0
        the address names the port actually bound; a unix socket's address
        is its real path, and ``socket_file`` (None for TCP) removes it at
        stop.

    Raises:
        StartupError: the address cannot be bound or TLS files are unreadable.
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    servicer = BandwidthPredictorServicer(core, log_rpcs=config.log_rpcs)
    add_to_server(servicer, server)
    health_servicer = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    kind, host, port = parse_listen(config.listen)
    sock: _SocketFile | None = None
    if kind == "unix":
        path = Path(host)
        sock = _prepare_socket_dir(path)
        try:
            # The socket file takes its mode from the umask at bind time; set
            # it so the file is never, even briefly, wider than socket_mode.
            with _umask(0o777 & ~config.socket_mode):
                bound = server.add_insecure_port(f"unix:{sock.path}")
            if not bound:
                raise StartupError(f"listen: cannot bind unix:{path}")
            sock.bound()
        except BaseException:
            sock.close()
            raise
        address = f"unix:{sock.path}"
    else:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if config.tls_cert:
                bound = server.add_secure_port(target, _server_credentials(config))
            else:
                log.warning(
                    "insecure_tcp",
                    listen=config.listen,
                    advice="allow_insecure_tcp: no TLS; anyone who can reach this address, "
                    "every local user included, can use the whole API",
                )
                bound = server.add_insecure_port(target)
        except RuntimeError as exc:
            raise StartupError(f"listen: cannot bind {target}: {exc}") from None
        if not bound:
            raise StartupError(f"listen: cannot bind {target}")
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    return server, address, health_servicer, sock


class Server:
    """The daemon: owns the gRPC server, the model, the state and signals.

    Args:
        config: the validated configuration.
        registry: Prometheus registry (a fresh one per Server by default).
        notifier: systemd notifications (from the environment by default).
    """

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.notifier = notifier or Notifier.from_env(dict(os.environ))
        self.should_exit = False
        self.force_exit = False
        self.reload_requested = False
        self.started = asyncio.Event()
        self.address = ""
        self.core: Core | None = None
        self._server: grpc.aio.Server | None = None
        self._socket: _SocketFile | None = None
        self._health: Health | None = None
        self._wake: asyncio.Event | None = None
        # The loop serve() runs on: the only thread that may touch the windows.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._metrics_server: MetricsServer | None = None
        self.metrics_address = ""
        self._last_snapshot = 0.0  # monotonic time of the last good snapshot
        self.recorder: Recorder | None = None

    # -- life cycle -----------------------------------------------------------------

    def run(self) -> int:
        """Serve until asked to stop; returns the process exit code."""
        return asyncio.run(self.serve())

    async def serve(self) -> int:
        """Start, serve, shut down. Returns 0 after a clean stop.

        Raises:
            StartupError: the daemon could not start.
        """
        self._wake = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        with self.capture_signals():
            try:
                await self.startup()
            except BaseException:
                await self._close_failed_start()
                raise
            try:
                await self.main_loop()
            finally:
                await self.shutdown()
        return 0

    @property
    def model_dir(self) -> Path:
        return Path(self.config.model_dir) if self.config.model_dir else DEFAULT_MODEL_DIR

    def _load(self) -> LoadedModel:
        return load_model(self.model_dir, self.config.ort_threads)

    async def startup(self) -> None:
        """Load the model, build and start the server, announce readiness."""
        config = self.config
        started = time.perf_counter()
        if self.state_dir is not None:
            _prepare_state_dir(self.state_dir)
        model: LoadedModel | None
        try:
            model = self._load()
        except ModelError as exc:
            if config.require_model:
                raise StartupError(f"model: {exc}") from None
            log.error("model_refused", error=str(exc), serving="BASELINE_FALLBACK")
            model = None
        engine = Engine(model)
        self.recorder = self._recorder()
        self.core = core = Core(config, engine, self.metrics, recorder=self.recorder)
        self.metrics.set_model(engine.version)
        if model is not None:
            log.info(
                "model_loaded",
                model_version=model.version,
                model_dir=str(model.path),
                sha256=model.sha256,
                load_ms=round(model.load_seconds * 1e3, 1),
            )
        self._restore()
        self._server, self.address, self._health, self._socket = create_server(config, core)
        await self._server.start()
        if config.metrics_addr:
            self._start_metrics()
        self.metrics.snapshot_age_from(
            lambda: time.monotonic() - self._last_snapshot if self._last_snapshot else -1.0
        )
        await self._set_health()
        self.started.set()
        if self.recorder is not None:
            self.metrics.recording_from(self.recorder.summary)
            self.recorder.start()
        log.info(
            "started",
            listen=self.address,
            model_version=engine.version or None,
            metrics=self.metrics_address or None,
            recording=str(self.recorder.directory) if self.recorder else None,
            startup_ms=round((time.perf_counter() - started) * 1e3, 1),
        )
        flush_logs()
        self.notifier.notify("READY=1", f"STATUS={self._status()}")

    def _status(self) -> str:
        """The one-line state systemd shows (``systemctl status``): where the
        daemon listens and what it serves."""
        assert self.core is not None
        return f"serving on {self.address}, model {self.core.engine.version or 'none (baselines)'}"

    async def _close_failed_start(self) -> None:
        """Close what a failed :meth:`startup` opened (the gRPC server and
        its socket, the metrics server) while the event loop still runs:
        left to the garbage collector, grpc's server tries to schedule its
        own shutdown on a closed loop and prints tracebacks after the one
        line that says why the start failed."""
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
        self._remove_socket()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        self.notifier.close()

    def _remove_socket(self) -> None:
        """Remove the unix socket if its name still holds the one bound."""
        if self._socket is not None:
            self._socket.remove()
            self._socket = None

    @property
    def state_dir(self) -> Path | None:
        return Path(self.config.state_dir) if self.config.state_dir else None

    def _recorder(self) -> Recorder | None:
        """The recorder of accepted samples: with ``record`` and a state
        directory, else None.

        Raises:
            StartupError: the node name or the recordings directory is unusable.
        """
        config = self.config
        if not config.record or self.state_dir is None:
            return None
        node = config.record_node or socket.gethostname()
        problem = check_record_node(node)
        if problem:
            raise StartupError(f"{problem} (the host name); set record_node")
        directory = self.state_dir / RECORDINGS_DIR
        try:
            return Recorder(
                directory,
                node,
                config.max_peers,
                max_bytes=config.record_max_bytes,
                max_age_s=config.record_max_age_s,
                flush_s=config.record_flush_s,
            )
        except OSError as exc:
            raise StartupError(f"record: {directory}: {exc.strerror or exc}") from None

    def _restore(self) -> None:
        """Load the snapshot into the store. One that cannot be restored in
        full, for any reason, is moved aside and the daemon starts empty."""
        assert self.core is not None
        if self.state_dir is None:
            return
        store = self.core.store
        try:
            arrays = load_snapshot(self.state_dir, store.snapshot_max_bytes())
            if arrays is None:
                return
            n = store.restore(arrays, self.core.clock(), self.config.snapshot_max_age_s)
        except Exception as exc:  # whatever is wrong with it must not stop a start
            try:
                moved_to = set_aside(self.state_dir)
            except OSError as err:
                moved_to = f"not moved: {err.strerror or err}"
            log.error(
                "snapshot_unreadable", error=f"{type(exc).__name__}: {exc}", moved_to=moved_to
            )
            return
        self.metrics.peers.set(len(store))
        log.info("snapshot_restored", peers=n, offered=len(arrays["peer_ids"]))

    async def snapshot(self) -> bool:
        """Copy the windows on the loop, write them off it; True on success."""
        assert self.core is not None
        if self.state_dir is None:
            return False
        arrays = self.core.store.snapshot()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, save_snapshot, arrays, self.state_dir
            )
        except OSError as exc:
            log.error("snapshot_failed", error=str(exc))
            return False
        self._last_snapshot = time.monotonic()
        return True

    def _start_metrics(self) -> None:
        host, _, port = self.config.metrics_addr.rpartition(":")
        self._metrics_server = MetricsServer(self.registry, host.strip("[]"), int(port))
        try:
            self._metrics_server.start()
        except OSError as exc:
            raise StartupError(
                f"metrics_addr: cannot bind {self.config.metrics_addr}: {exc}"
            ) from None
        self.metrics_address = f"{host}:{self._metrics_server.port}"

    async def _set_health(self) -> None:
        """Serving; the model's own service says whether a model is loaded."""
        assert self._health is not None and self.core is not None
        await self._health.set("", SERVING)
        await self._health.set(SERVICE_NAME, SERVING)
        model_ok = self.core.engine.model is not None
        await self._health.set(MODEL_HEALTH_SERVICE, SERVING if model_ok else NOT_SERVING)

    async def main_loop(self) -> None:
        """Wait for signals; run periodic upkeep (expiry, watchdog)."""
        assert self._wake is not None
        tick = min(1.0, self.config.snapshot_interval_s)
        if self.notifier.watchdog_interval_s:
            tick = min(tick, self.notifier.watchdog_interval_s)
        last_expiry = last_snapshot = time.monotonic()
        manifest_stamp = self._manifest_stamp()
        while not self.should_exit:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=tick)
            self._wake.clear()
            if self.config.watch_model_dir:
                stamp = self._manifest_stamp()
                if stamp != manifest_stamp:
                    manifest_stamp = stamp
                    self.reload_requested = True
            if self.reload_requested:
                self.reload_requested = False
                await self.reload()
            if self.notifier.watchdog_usec:
                self.notifier.notify("WATCHDOG=1")
            flush_logs()
            now = time.monotonic()
            if (
                now - last_expiry >= min(10.0, self.config.idle_expiry_s / 2)
                and self.core is not None
            ):
                last_expiry = now
                self.core.expire_idle()
            if (
                self.state_dir is not None
                and now - last_snapshot >= self.config.snapshot_interval_s
            ):
                last_snapshot = now
                await self.snapshot()

    def _manifest_stamp(self) -> tuple[int, int] | None:
        """(mtime, inode) of the manifest: a publish by rename changes both."""
        try:
            st = (self.model_dir / "manifest.json").stat()
        except (OSError, ValueError):  # ValueError: a NUL in model_dir
            return None
        return (st.st_mtime_ns, st.st_ino)

    async def reload(self) -> bool:
        """Build, verify and smoke-test the model directory off the event
        loop, then swap it in. A failure keeps the old model serving.

        Returns:
            True if the new model now serves.
        """
        assert self.core is not None
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        old = self.core.engine.version
        try:
            model = await asyncio.get_running_loop().run_in_executor(None, self._load)
        except ModelError as exc:
            self.metrics.reloads.labels(outcome="failed").inc()
            log.error("model_reload_failed", error=str(exc), model_version=old or None)
            self.notifier.notify("READY=1", f"STATUS=reload failed; {self._status()}")
            return False
        self.core.swap_model(model)
        await self._set_health()
        self.metrics.reloads.labels(outcome="ok").inc()
        log.info(
            "model_reloaded",
            model_version=model.version,
            previous_version=old or None,
            sha256=model.sha256,
            load_ms=round(model.load_seconds * 1e3, 1),
        )
        self.notifier.notify("READY=1", f"STATUS={self._status()}")
        return True

    async def shutdown(self) -> None:
        """Stop taking calls, let in-flight ones finish, then clean up."""
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        log.info("stopping", grace_s=self.config.grace_period_s)
        if self._health is not None:
            await self._health.close()  # Watch streams say NOT_SERVING and end
        if self.core is not None:
            self.core.watch.close()  # ends WatchForecasts streams so the drain can finish
        if self._server is not None:
            grace = 0 if self.force_exit else self.config.grace_period_s
            await self._server.stop(grace)
        if self.core is not None:
            self.core.close()
        if self.recorder is not None:
            # No more ingest: write what the recorder holds, off the loop.
            await asyncio.get_running_loop().run_in_executor(None, self.recorder.close)
            summary = self.recorder.summary()
            log.info("recording_closed", **{k: int(v) for k, v in summary.items()})
        if self.core is not None and self.state_dir is not None and await self.snapshot():
            log.info("snapshot_written", peers=len(self.core.store))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self._remove_socket()
        self.notifier.close()
        log.info("stopped")
        flush_logs()

    # -- signals --------------------------------------------------------------------

    def request_exit(self, force: bool = False) -> None:
        """Ask the main loop to stop (what SIGTERM/SIGINT do)."""
        if self.should_exit and force:
            self.force_exit = True
        self.should_exit = True
        if self._wake is not None:
            self._wake.set()

    def request_reload(self) -> None:
        """Ask the main loop to reload the model (what SIGHUP does)."""
        self.reload_requested = True
        if self._wake is not None:
            self._wake.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install SIGTERM/SIGINT/SIGHUP handlers that set flags; restore the
        previous handlers on exit. A no-op off the main thread (tests)."""
        try:
            loop = asyncio.get_running_loop()
            handlers = {
                signal.SIGTERM: self.request_exit,
                signal.SIGINT: lambda: self.request_exit(force=True),
                signal.SIGHUP: self.request_reload,
            }
            for sig, fn in handlers.items():
                loop.add_signal_handler(sig, fn)
        except (RuntimeError, ValueError):  # not the main thread
            yield
            return
        try:
            yield
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)
