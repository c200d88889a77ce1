"""Run a command the way systemd starts a socket-activated service (sd_listen_fds(3)).

    python tests/listenfds.py FD[,FD...] NAMES|- COMMAND [ARG...]

The descriptors (passed to this process by the test) are placed at 3, 4, ... and LISTEN_PID,
LISTEN_FDS and LISTEN_FDNAMES set; the test keeps its own copies, as systemd keeps the socket of
a .socket unit. COMMAND may be ``systemd-socket-activate``, which passes them on.
"""

import fcntl
import os
import sys


def main() -> None:
    fds = [int(fd) for fd in sys.argv[1].split(",")]
    # Out of the way first: a source (or a plain dup of one) may sit on a target number.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
    for fd in fds:  # the test's numbers are inheritable (pass_fds): systemd leaks none
        if not 3 <= fd < 3 + len(fds):
            os.close(fd)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
    if sys.argv[2] != "-":
        os.environ["LISTEN_FDNAMES"] = sys.argv[2]
    os.execvp(sys.argv[3], sys.argv[3:])


if __name__ == "__main__":
    main()
