"""A worker run as a child process on a throwaway topology: what `loraq demo` and the end-to-end
benchmark start, watch through /healthz, and stop with SIGTERM.

The worker gets its own topology names (`topology_args`, removed afterwards with `delete_topology`)
and a free metrics port, so it never mixes with a worker already serving the default queue.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import aio_pika

from consumer.metrics import probe
from consumer.protocol import Topology

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_COMMAND = (sys.executable, "-m", "consumer")


def free_port() -> int:
    """A TCP port nobody listens on right now (for the worker's metrics server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def topology_args(topology: Topology) -> list[str]:
    """Worker flags naming every object of `topology`."""
    return [arg for f in fields(topology)
            for arg in (f"--{f.name.replace('_', '-')}", str(getattr(topology, f.name)))]


async def delete_topology(url: str, topology: Topology) -> None:
    """Remove the queues and exchanges of a throwaway topology (best effort)."""
    try:
        connection = await aio_pika.connect(url)
    except (ConnectionError, OSError):
        return
    async with connection:
        for name in (topology.queue, topology.dead_queue, topology.retry_queue):
            channel = await connection.channel()  # a failed delete closes its channel
            try:
                await channel.queue_delete(name)
            except aio_pika.exceptions.AMQPError:
                pass
        for name in (topology.exchange, topology.dlx, topology.results_exchange, topology.cancel_exchange):
            channel = await connection.channel()
            try:
                await channel.exchange_delete(name)
            except aio_pika.exceptions.AMQPError:
                pass


class WorkerProcess:
    """`command` + `args` as a child process (by default `python -m consumer`), its JSON logs in
    `log_path`, /healthz on `metrics_port`."""

    def __init__(self, args: Sequence[str], log_path: Path, metrics_port: int,
                 command: Sequence[str] = WORKER_COMMAND) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.metrics_port = metrics_port
        self.command = tuple(command)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [*self.command, *self.args,
               "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1"]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    async def wait_healthy(self, timeout: float,
                           progress: Callable[[float, str], None] | None = None) -> float:
        """Poll /healthz until 200; seconds it took. Raises RuntimeError if the worker exits or
        the timeout passes (the message ends with the log's last lines)."""
        if self.proc is None:
            raise RuntimeError("the worker was never started")
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.proc.returncode} while "
                                   f"starting; its log:\n{self.log_tail()}")
            if await asyncio.to_thread(probe, self.metrics_port, "127.0.0.1", 1.0):
                return elapsed
            if elapsed > timeout:
                raise RuntimeError(f"the worker was not healthy after {timeout:.0f} s; its log:\n"
                                   f"{self.log_tail()}")
            if progress is not None:
                progress(elapsed, self.last_status())
            await asyncio.sleep(0.5)

    def last_status(self) -> str:
        """The log's latest line, for a progress display: a JSON event's name, or plain text (the
        model loader's progress bars redraw one line with carriage returns)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                tail = f.read().decode(errors="replace")
        except OSError:
            return ""
        pieces = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
        if not pieces:
            return ""
        try:
            event = json.loads(pieces[-1])
        except ValueError:
            return pieces[-1][:60]
        return str(event.get("event", "")) if isinstance(event, dict) else pieces[-1][:60]

    def log_tail(self, lines: int = 25) -> str:
        """The log's last lines, each as last drawn (progress bars redraw with carriage returns)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")[-lines:])

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the worker drains in-flight jobs), wait; SIGKILL if it hangs. Exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
