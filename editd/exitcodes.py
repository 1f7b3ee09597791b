"""Every exit status an `editd` process can end with, in one place.

One number, one meaning, for every command: a script (systemd's `RestartPreventExitStatus`, a
supervisor, CI) can act on the code alone. README's "Exit codes" table is this module in prose;
`tests/test_exitcodes.py` keeps them equal. Commands that stop on a fault print or log one line
naming it; codes 3 to 8 are faults a restart does not cure, so they are worth not restarting on.
"""

from __future__ import annotations

EXIT_OK = 0
"""Done; for `editd run`, stopped on SIGTERM/SIGINT after the in-flight batch."""
EXIT_FAILURE = 1
"""Failed in a way the command cannot judge (the log or stderr says what, an unexpected error
with its traceback); for `editd run`, a failed batch is replayed on restart; for `editd publish`,
some records were rejected locally (the others were published)."""
EXIT_USAGE = 2
"""Bad arguments or configuration (argparse's own code for a bad flag, and a settings error)."""
EXIT_BIND = 3
"""`editd run`: the HTTP port is taken or not allowed."""
EXIT_STORE_LOCKED = 4
"""Another process holds the edit store (a second daemon on the same data dir?)."""
EXIT_STORE_MISMATCH = 5
"""The store was made for another model, layers or dtype."""
EXIT_RESTORE_FAILED = 6
"""The store's current version does not rebuild to its recorded sha256, or cannot be read."""
EXIT_FATAL = 7
"""The served model can no longer be trusted (device error, out of memory on one fact, a failed
rollback)."""
EXIT_KAFKA = 8
"""The configured Kafka cannot be used: unreachable within `kafka.connect_timeout_ms`, refused
TLS or SASL, topics that cannot be created, or (`editd publish`) facts it did not take."""
EXIT_DISK_FULL = 12
"""The data dir's disk is full (ENOSPC, EDQUOT) during a commit: nothing was lost, the batch is
replayed; free space and restart."""
EXIT_UPDATE_LOG_TAKEN = 13
"""The update log (`kafka.updates_topic`) is another editor's: start with
`--take-over-updates-log` to make this editor's lineage the one replicas follow."""
EXIT_INTERRUPTED = 130
"""A second SIGTERM/SIGINT (or Ctrl-C): exited at once; what was not durable is replayed."""

ALL: dict[int, str] = {
    EXIT_OK: "EXIT_OK",
    EXIT_FAILURE: "EXIT_FAILURE",
    EXIT_USAGE: "EXIT_USAGE",
    EXIT_BIND: "EXIT_BIND",
    EXIT_STORE_LOCKED: "EXIT_STORE_LOCKED",
    EXIT_STORE_MISMATCH: "EXIT_STORE_MISMATCH",
    EXIT_RESTORE_FAILED: "EXIT_RESTORE_FAILED",
    EXIT_FATAL: "EXIT_FATAL",
    EXIT_KAFKA: "EXIT_KAFKA",
    EXIT_DISK_FULL: "EXIT_DISK_FULL",
    EXIT_UPDATE_LOG_TAKEN: "EXIT_UPDATE_LOG_TAKEN",
    EXIT_INTERRUPTED: "EXIT_INTERRUPTED",
}
"""Code → name, for the test that keeps README's table in step."""
