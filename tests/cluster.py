"""A throwaway 3-node RabbitMQ cluster on this host, for tests that stop broker nodes.

The machine's own broker (rabbit@localhost, port 5672) is never touched. Each node here gets:
    its own name       loraq-<amqp port>@localhost (a leftover node from a crashed run holds its
                       ports, so the next run picks other ports and so other names)
    its own ports      AMQP on 127.0.0.1:<port>, Erlang distribution on <port> + 20000
    its own files      config, enabled plugins (only rabbitmq_consistent_hash_exchange: no management
                       or Prometheus listeners), data, logs and pid file under one temporary root
    its own cookie     <root>/home/.erlang.cookie, with HOME pointing there for the nodes and for
                       every rabbitmqctl call: a call that named the machine's broker by mistake would
                       be refused for a wrong cookie instead of acting on it
The nodes share the host's epmd (a name registry only). The three nodes boot in parallel, then the
second and third join the first (stop_app / join_cluster / start_app) one after the other: joined
together, one node's start_app can fail while the other's mnesia syncs (seen on 3.10: mnesia_monitor
killed, BOOT FAILED).

`stop(node)` is `rabbitmqctl stop_app`: the Erlang VM stays up, the AMQP listener closes, client
connections are closed by the broker, and its quorum queue replicas are offline (a leader there
hands over to an elected one) until `start(node)` (`start_app`). Every method that calls
rabbitmqctl blocks while the CLI boots a VM of its own: from async code call it through
`asyncio.to_thread`. A test run killed outright leaves its nodes running (their own sessions);
the next run takes other free ports, and `rabbitmqctl -n loraq-<port>@localhost stop` with HOME
set to that run's root ends them.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

DIST_PORT_OFFSET = 20000  # RabbitMQ's own default: distribution port = AMQP port + 20000
PLUGINS = "[rabbitmq_consistent_hash_exchange]."
CTL_TIMEOUT_S = 60.0  # one rabbitmqctl call (the CLI's own start included)


def find_scripts() -> Path | None:
    """The directory of the real rabbitmq-server / rabbitmqctl scripts, or None if not installed:
    LORAQ_TEST_RABBITMQ_BIN when set (scripts/rabbitmq4.sh: RabbitMQ 4 in a chroot), else
    /usr/lib/rabbitmq/bin, then the PATH's (Debian's /usr/sbin ones are wrappers that `su rabbitmq`
    when run as root, dropping our HOME)."""
    chosen = os.environ.get("LORAQ_TEST_RABBITMQ_BIN")
    candidates = [Path(chosen)] if chosen else [Path("/usr/lib/rabbitmq/bin")]
    on_path = shutil.which("rabbitmq-server")
    if on_path and not chosen:
        candidates.append(Path(on_path).resolve().parent)
    for directory in candidates:
        if (directory / "rabbitmq-server").exists() and (directory / "rabbitmqctl").exists():
            return directory
    return None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the nodes bind: TIME_WAIT is no conflict
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(first: int, size: int) -> int:
    """The lowest port >= `first` from which `size` consecutive AMQP ports and their distribution
    ports are all free."""
    for base in range(first, first + 200, size):
        ports = range(base, base + size)
        if all(port_free(p) and port_free(p + DIST_PORT_OFFSET) for p in ports):
            return base
    raise RuntimeError(f"no {size} free consecutive ports from {first}")


class ClusterError(RuntimeError):
    """A node failed to start, join or answer; the message carries the node's log tail."""


@dataclass(frozen=True)
class Node:
    name: str  # Erlang node name, e.g. loraq-5681@localhost
    port: int  # AMQP port on 127.0.0.1
    dir: Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


class RabbitCluster:
    """Three (by default) clustered RabbitMQ nodes under `root`. Use `start_cluster()` once, then
    `stop` / `start` single nodes by name, and `close()` at the end (it also deletes `root`)."""

    def __init__(self, root: Path, size: int = 3, first_port: int = 5681, boot_timeout_s: float = 180.0) -> None:
        scripts = find_scripts()
        if scripts is None:
            raise ClusterError("rabbitmq-server / rabbitmqctl not found")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.scripts = scripts
        self.root = root
        self.boot_timeout_s = boot_timeout_s
        base = free_base_port(first_port, size)
        self.nodes = tuple(Node(f"loraq-{p}@localhost", p, root / f"loraq-{p}") for p in range(base, base + size))
        self.stopped: set[str] = set()  # nodes whose app is stopped by `stop`
        self.boot_s: float | None = None  # how long `start_cluster` took
        self._processes: dict[str, subprocess.Popen] = {}
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20))
        cookie.chmod(0o400)
        (root / "rabbitmq-env.conf").write_text("")  # read instead of /etc/rabbitmq/rabbitmq-env.conf

    # ---- the public surface -------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """AMQP URLs of the nodes, in node order."""
        return [n.url for n in self.nodes]

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"{name} is not a node of this cluster: {self.names}")

    def start_cluster(self) -> None:
        """Boot every node in parallel, wait until each is up, then join the others to the first, in turn."""
        began = time.monotonic()
        try:
            for n in self.nodes:
                self._launch(n)
            self._parallel(self._await_boot, self.nodes)
            for n in self.nodes[1:]:
                self._join(n)
            running = self._running_nodes()
            if running != set(self.names):
                raise ClusterError(f"cluster formed with {sorted(running)}, expected {self.names}")
            self.boot_s = time.monotonic() - began
        except BaseException:
            self.close()
            raise

    def stop(self, name: str) -> None:
        """Stop the RabbitMQ app on `name` (`rabbitmqctl stop_app`; the Erlang VM keeps running)."""
        self._ctl(name, "stop_app")
        self.stopped.add(name)

    def start(self, name: str) -> None:
        """Start the app stopped by `stop` again; it rejoins the cluster and its quorum queues."""
        self._ctl(name, "start_app")
        self._ctl(name, "await_startup", timeout=self.boot_timeout_s)
        self.stopped.discard(name)

    def start_stopped(self) -> None:
        """Start every node that `stop` left stopped (a test's clean-up)."""
        for name in sorted(self.stopped):
            self.start(name)

    def leader_of(self, queue: str, vhost: str = "/") -> str:
        """The node name of a quorum queue's leader, as a running node reports it."""
        return str(self._queue_info(queue, vhost)["leader"])

    def members_of(self, queue: str, vhost: str = "/") -> list[str]:
        """The node names holding a replica of a quorum queue."""
        return sorted(self._queue_info(queue, vhost)["members"])

    def close(self) -> None:
        """Stop every node (`rabbitmqctl stop`, then SIGKILL of its process group if it lingers)
        and delete the cluster's directory."""
        launched = [n for n in self.nodes if n.name in self._processes]
        self._parallel(self._halt, launched, raise_first=False)
        self._processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- internals ----------------------------------------------------------------------------

    def _env(self, node: Node | None = None) -> dict[str, str]:
        """The process environment: nothing inherited that names another node, cookie or config."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env |= {"HOME": str(self.root / "home"), "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}"}
        if node is not None:
            env |= {
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(node.port),
                "RABBITMQ_DIST_PORT": str(node.port + DIST_PORT_OFFSET),
                "RABBITMQ_CONFIG_FILE": str(node.dir / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.dir / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(node.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.dir / "log"),
                "RABBITMQ_PID_FILE": str(node.dir / "rabbitmq.pid"),
            }
        return env

    def _launch(self, node: Node) -> None:
        node.dir.mkdir(parents=True)
        # the machine's /etc/rabbitmq/rabbitmq.conf would bind 5672: every node reads its own instead
        (node.dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{node.port}\n")
        (node.dir / "enabled_plugins").write_text(PLUGINS + "\n")
        with open(node.dir / "stdout.log", "wb") as out:
            # a session of its own: its process group id is its pid, so `_halt` can end the whole tree
            self._processes[node.name] = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")], env=self._env(node), cwd=node.dir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _await_boot(self, node: Node) -> None:
        """Until the node's app runs. `await_startup` fails at once for a node not yet registered
        with epmd, so wait for its pid file first (written early in its boot) and retry."""
        deadline = time.monotonic() + self.boot_timeout_s
        process = self._processes[node.name]
        while True:
            if process.poll() is not None:
                raise ClusterError(f"{node.name} exited with {process.returncode}\n{self._log_tail(node.name)}")
            if (node.dir / "rabbitmq.pid").exists():
                try:
                    self._ctl(node.name, "await_startup", timeout=max(1.0, deadline - time.monotonic()))
                    return
                except ClusterError:
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                raise ClusterError(f"{node.name} did not start in {self.boot_timeout_s} s\n{self._log_tail(node.name)}")
            time.sleep(0.5)

    def _join(self, node: Node) -> None:
        first = self.nodes[0].name
        self._ctl(node.name, "stop_app")
        self._ctl(node.name, "join_cluster", first)
        self._ctl(node.name, "start_app")

    def _running_nodes(self) -> set[str]:
        out = self._ctl(self._any_running(), "cluster_status", "--formatter", "json")
        return set(json.loads(out)["running_nodes"])

    def _queue_info(self, queue: str, vhost: str) -> dict:
        out = self._ctl(self._any_running(), "list_queues", "-p", vhost, "--formatter", "json",
                        "name", "type", "leader", "members")
        for row in json.loads(out):
            if row["name"] == queue:
                if row["type"] != "quorum":
                    raise ClusterError(f"queue {queue} is {row['type']}, not a quorum queue")
                return row
        raise ClusterError(f"no queue {queue} in vhost {vhost}")

    def _any_running(self) -> str:
        for name in self.names:
            if name not in self.stopped:
                return name
        raise ClusterError("every node is stopped")

    def _ctl(self, node: str, *args: str, timeout: float = CTL_TIMEOUT_S) -> str:
        """`rabbitmqctl -n <node> ...`: always a node of this cluster, never the CLI's default node."""
        self.node(node)
        extra = ("--timeout", str(int(timeout))) if args[0] == "await_startup" else ()
        result = subprocess.run([str(self.scripts / "rabbitmqctl"), "-q", "-n", node, *args, *extra],
                                env=self._env(), cwd=self.root, capture_output=True, text=True,
                                timeout=timeout + 30)
        if result.returncode != 0:
            raise ClusterError(f"rabbitmqctl -n {node} {' '.join(args)}: exit {result.returncode}\n"
                               f"{result.stdout}{result.stderr}\n{self._log_tail(node)}")
        return result.stdout

    def _halt(self, node: Node) -> None:
        process = self._processes[node.name]
        if process.poll() is None:
            try:
                self._ctl(node.name, "stop", timeout=30)
            except (ClusterError, subprocess.TimeoutExpired):
                pass  # killed below
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # beam and its port programs, if any survived
        except ProcessLookupError:
            pass
        process.wait()

    def _log_tail(self, node: str, lines: int = 30) -> str:
        n = self.node(node)
        logs = sorted((n.dir / "log").glob("*.log")) + [n.dir / "stdout.log"]
        tails = []
        for path in logs:
            if path.exists():
                tails.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    @staticmethod
    def _parallel(fn: Callable[[Node], object], nodes: Sequence[Node], raise_first: bool = True) -> None:
        """fn(node) for every node at once; re-raises the first failure (after all have finished)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            futures = [pool.submit(fn, n) for n in nodes]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors and raise_first:
            raise errors[0]

