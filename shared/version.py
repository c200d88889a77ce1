"""The version iupop3 announces in its greeting, X-POP3-Server and XTND STATS."""

VERSION = "2.0"
