"""A scripted POP3 listener for client tests: it offers no STLS (like a server behind a man in
the middle who strips it from CAPA), records every line it receives, and can answer XTND with
any bytes. Run as a script it serves one address and prints its port (for a network namespace).
"""

from __future__ import annotations

import socket
import sys
import threading


class FakePop:
    def __init__(self, host: str = "127.0.0.1", xtnd_reply: bytes = b"+OK done"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.settimeout(60)  # bounded: a test that never connects does not hang a thread
        self.port = self.sock.getsockname()[1]
        self.xtnd_reply = xtnd_reply
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for _ in range(16):  # a few connections per test at most
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(b"+OK fake POP3 server ready\r\n")
        buffer = b""
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                self.received.append(line)
                verb = line.split(b" ")[0].upper()
                if verb == b"CAPA":
                    conn.sendall(b"+OK\r\nUSER\r\nUIDL\r\n.\r\n")  # no STLS
                elif verb == b"XTND":
                    conn.sendall(self.xtnd_reply + b"\r\n")
                else:
                    conn.sendall(b"+OK\r\n")
                if verb == b"QUIT":
                    return


if __name__ == "__main__":
    server = FakePop(sys.argv[1])
    print(server.port, flush=True)
    sys.stdin.read()  # serve until the test closes our stdin
    print("RECEIVED", b"|".join(server.received).decode("ascii", "backslashreplace"), flush=True)
