"""The lines the supervisor writes to a connection it will not hand to a worker.

They are opaque bytes to the supervisor: it only knows *why* it refuses, not which protocol the
line belongs to. The wording follows RFC 2449's [SYS/TEMP] code.
"""

# Also what a worker answers a session it closes at shutdown (worker/replies.py): one wording.
SHUTTING_DOWN_TEXT = "-ERR [SYS/TEMP] server is shutting down, try again later"

TOO_MANY_SESSIONS = b"-ERR [SYS/TEMP] too many sessions, try again later\r\n"
SHUTTING_DOWN = SHUTTING_DOWN_TEXT.encode() + b"\r\n"
NO_WORKER = b"-ERR [SYS/TEMP] no worker can take the session now, try again later\r\n"
TOO_MANY_FROM_ADDRESS = b"-ERR [SYS/TEMP] too many sessions from your address, try again later\r\n"
