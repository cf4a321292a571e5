"""User-facing errors and warnings: one line on stderr each; a UserError exits 2, no traceback."""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable


class UserError(Exception):
  """Bad input or usage. The message names the file, field or flag and what was expected."""


def first_line(e: BaseException, limit: int = 300) -> str:
  """`Type: message` of an exception from a library, cut to its first line (for one-line
  errors and warnings that quote it)."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:limit]


def drop_closed_loop_noise() -> None:
  """After a failed orbax restore (a damaged checkpoint), tensorstore completes its pending
  futures on orbax's closed asyncio loop and each prints a 'RuntimeError: Event loop is
  closed' traceback through sys.unraisablehook: drop those, and only those."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_noise", False):
    return

  def hook(unraisable) -> None:
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop_noise = True
  sys.unraisablehook = hook


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
  del category, filename, lineno, line
  text = str(message).strip().splitlines()
  print(f"warning: {text[0] if text else ''}", file=file or sys.stderr, flush=True)


def cli_entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
  """Wraps a CLI main: a UserError (or argparse's own usage error) exits 2 with one line, and
  warnings print as one `warning: ...` line (not Python's file:line + source form)."""

  @functools.wraps(main)
  def wrapper(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
      warnings.showwarning = _one_line_warning
      try:
        return int(main(argv) or 0)
      except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
      except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

  return wrapper
