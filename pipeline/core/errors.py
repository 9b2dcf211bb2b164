"""One exception type for problems a user can fix, and the CLI wrapper that reports it.

Every stage raises :class:`PipelineError` for bad input (a missing file, a label out of range,
a typo in params.yaml). ``run_cli`` turns it into a single ``error: ...`` line on stderr and
exit code 2, with no traceback: the message must name the file or key at fault.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

EXIT_USAGE = 2


class PipelineError(Exception):
    """A user-facing error; ``str(err)`` is the complete one-line message."""


def unknown_name(kind: str, name: str, valid: Sequence[str]) -> PipelineError:
    """Error for a registry lookup that failed, listing every valid name."""
    return PipelineError(f"unknown {kind} '{name}'; valid: {', '.join(sorted(valid))}")


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main`` and exit: 0 on success, 2 with one line on a PipelineError."""
    try:
        main(argv)
    except PipelineError as err:
        message = " ".join(str(err).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
