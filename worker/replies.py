"""The POP3 session's status lines, by name; tests import the same constants.

XTND's replies live in worker/xtnd.py, the supervisor's refusals in shared/refusal.py; the lines
of a multi-line answer (CAPA, AUTH's mechanism list) are written where they are built. The
wording of the IUPOP3 1.8 README's transcript is kept where it quotes one; response codes are
RFC 2449 / RFC 3206.
"""

from shared.refusal import SHUTTING_DOWN_TEXT

GREETING = "+OK IUPOP3 server V{version} at {host}, up since {since}"
PASSWORD_REQUIRED = '+OK Password required for "{user}"'
LOGIN_OK = "+OK Username/password combination ok"
# The README's words, with RFC 3206's [AUTH] code since CAPA announces AUTH-RESP-CODE.
NOT_ACCESSIBLE = '-ERR [AUTH] user account "{user}" not accessible'
SIGNING_OFF = "+OK IUPOP3 server at {host} signing off."

USER_FIRST = "-ERR give USER first"
CLEARTEXT_REFUSED = "-ERR [AUTH] cleartext login is not allowed here: use STLS first"
STLS = "+OK Begin TLS negotiation now"
STLS_UNAVAILABLE = "-ERR STLS is not available now"
APOP_UNAVAILABLE = "-ERR APOP is not enabled on this server"
SASL_LIST = "+OK SASL mechanisms follow"
SASL_UNKNOWN = "-ERR [AUTH] unsupported SASL mechanism"
SASL_FAILED = NOT_ACCESSIBLE
SASL_MALFORMED = "-ERR [AUTH] malformed authentication exchange"
SASL_CANCELLED = "-ERR authentication cancelled"
BAD_USER_NAME = "-ERR [AUTH] invalid user name"
ADDRESS_BLOCKED = "-ERR [SYS/TEMP] too many failed logins from your address, try again later"
LOGIN_DEFERRED = "-ERR [SYS/TEMP] too many login attempts for this user now, try again later"
IN_USE = "-ERR [IN-USE] maildrop is in use by another session"
# Issue 13: no response code; RFC 2449 defines [IN-USE] only for replies to a login.
TAKEN_OVER = "-ERR session taken over by a new login"
# RFC 2449 section 8.1.1: given only after a correct password, so it cannot probe accounts.
LOGIN_DELAYED = "-ERR [LOGIN-DELAY] wait {seconds} more seconds between logins"
MAILDROP_UNAVAILABLE = "-ERR [SYS/TEMP] maildrop cannot be opened now"

UNKNOWN_COMMAND = "-ERR unknown command"
WRONG_STATE = "-ERR command not valid in this state"
BAD_ARGUMENTS = "-ERR wrong arguments for {verb}"
LINE_TOO_LONG = "-ERR line too long"
TOO_MANY_BAD_COMMANDS = "-ERR too many bad commands, closing the connection"
LOGIN_TIMEOUT = "-ERR no login within {seconds} seconds, closing the connection"
NO_SUCH_MESSAGE = "-ERR no such message"
ALREADY_DELETED = "-ERR message {n} already deleted"
SERVER_ERROR = "-ERR [SYS/TEMP] internal server error"
TIMEOUT = "-ERR [SYS/TEMP] connection timed out after {seconds} seconds of silence"
SHUTTING_DOWN = SHUTTING_DOWN_TEXT
UPDATE_FAILED = "-ERR [SYS/TEMP] some deleted messages were not removed"

STAT = "+OK {count} {octets}"
LIST_ALL = "+OK {count} messages ({octets} octets)"
LIST_ONE = "+OK {n} {octets}"
UIDL_ALL = "+OK unique-id listing follows"
UIDL_ONE = "+OK {n} {uid}"
RETR = "+OK {octets} octets"
TOP = "+OK top of message follows"
DELE = "+OK message {n} deleted"
RSET = "+OK maildrop has {count} messages ({octets} octets)"
NOOP = "+OK"
CAPA = "+OK Capability list follows"
