"""The benchmark suite: iupop3 against a private Dovecot (see bench/README.md)."""
