"""Start several launcher processes that form one job (two 'hosts' or 'nodes' on loopback) and never leave one behind.

Each launch gets its own process group and its own log file (a pipe nobody reads would block it). If one exits with
an error the others are killed at once: a host whose peer is gone waits for it (rendezvous, collectives) rather
than failing. Whatever happens, including a deadline or an exception in the test, every process group is killed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A port nobody listens on now. Fixed ports collide with other runs on the same machine: a second job's host 0
    is refused the port and exits, and its host 1 joins (or waits for) a rendezvous that is not its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _kill(process: subprocess.Popen) -> None:
    """Kill the launch's whole process group (launcher and workers), unless it finished cleanly."""
    if process.returncode == 0:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_together(commands: list[list[str]], *, cwd, env, logs: Path, timeout: float,
                 first_listens_on: int | None = None) -> list[str]:
    """Run the commands as one job; return their outputs, or fail the test with every output if any one fails or
    the whole takes longer than `timeout` seconds. With `first_listens_on`, the others start only once the first
    listens on that port (its rendezvous store is up), so they can only ever join this job."""
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    processes: list[subprocess.Popen] = []
    files = []

    def outputs() -> list[str]:
        for handle in files:
            handle.flush()
        return [(logs / f"launch{index}.log").read_text(errors="replace") for index in range(len(files))]

    def failure(reason: str) -> str:
        text = [reason]
        for index, output in enumerate(outputs()):
            text.append(f"----- launch {index}: exit {processes[index].returncode}\n{output[-5000:]}")
        return "\n".join(text)

    try:
        for index, command in enumerate(commands):
            handle = open(logs / f"launch{index}.log", "w")
            files.append(handle)
            processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            if index == 0 and first_listens_on is not None:
                while not _listening(first_listens_on):
                    if processes[0].poll() is not None:
                        pytest.fail(failure(f"launch 0 exited before listening on port {first_listens_on}"))
                    if time.monotonic() > deadline:
                        pytest.fail(failure(f"launch 0 did not listen on port {first_listens_on} in time"))
                    time.sleep(0.2)
        while True:
            codes = [process.poll() for process in processes]
            if any(code not in (None, 0) for code in codes):
                failed = [index for index, code in enumerate(codes) if code not in (None, 0)]
                for process in processes:
                    _kill(process)
                pytest.fail(failure(f"launch {failed} failed; the others were killed"))
            if all(code == 0 for code in codes):
                return outputs()
            if time.monotonic() > deadline:
                for process in processes:
                    _kill(process)
                pytest.fail(failure(f"not finished after {timeout:.0f} s; all launches killed"))
            time.sleep(0.5)
    finally:
        for process in processes:
            _kill(process)
        for handle in files:
            handle.close()
