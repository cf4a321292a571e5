"""User-facing errors: one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
  """Bad input or usage. The message names the file, field or flag and what was expected."""


def cli_entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
  """Wraps a CLI main: a UserError (or argparse's own usage error) exits 2 with one line."""

  @functools.wraps(main)
  def wrapper(argv: list[str] | None = None) -> int:
    try:
      return int(main(argv) or 0)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return 130

  return wrapper
