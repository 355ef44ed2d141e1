"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a store that is
not ours) is raised as one of these. The CLI turns them into one line on stderr
and an exit code, never a traceback:

* exit 2 -- usage or configuration errors (:class:`ConfigError`);
* exit 1 -- data errors: files, stores, images, checkpoints (:class:`DataError`).
"""

from __future__ import annotations


class MCPipeError(Exception):
    """Base class of every error meant to be shown to a user as one line."""

    exit_code = 1


class ConfigError(MCPipeError):
    """A configuration key, value or command-line option is wrong."""

    exit_code = 2


class DataError(MCPipeError):
    """Input data, a feature store or a run directory is missing or invalid."""

    exit_code = 1
