"""The supervisor out of descriptors when it must start a worker: the failed
socketpair counts as a failed start (BACKOFF), the supervisor lives on and starts the worker
once descriptors are free again."""

from __future__ import annotations

import os
import resource
import signal

from processes import wait_until


def test_respawn_without_a_free_descriptor_backs_off_and_retries(start_server):
    """With its descriptor limit cut to 3, a killed worker's respawn fails with EMFILE: logged,
    the supervisor survives and restarts the slot after the limit comes back."""
    server = start_server()
    victim = server.worker_pids()[1]
    limits = resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE)
    mark = server.mark()
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (3, limits[1]))
    try:
        os.kill(victim, signal.SIGKILL)
        server.wait_for(r"cannot start worker 1: .*Too many open files", start=mark)
        server.wait_for(r"worker 1 died before it was ready", start=mark)
        assert server.proc.poll() is None
    finally:
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, limits)
    server.wait_for(r"worker 1 started, pid \d+", start=mark, timeout=30)
    server.wait_for(r"worker 1 ready", start=mark, timeout=30)
    assert wait_until(lambda: server.worker_pids()[1] != victim)
    client = server.login("alice")
    client.stat()
    client.quit()
    assert "Traceback" not in server.output
    assert server.proc.poll() is None
