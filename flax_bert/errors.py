"""The ground every other module stands on: the base of every user-facing exception. A mistake the user can fix
(a flag, a file, a run directory, a missing package) raises InputError or a subclass of it; the command prints
its message as one line and exits nonzero. Anything else is a failure of the program or the machine and keeps
its traceback (flax_bert.cli.run_command). This module imports nothing from the project.

They subclass the built-in exceptions they replace, so `except ValueError` / `except FileNotFoundError` still
catch them."""


class InputError(ValueError):
    """A value the user gave does not work (a flag, an option combination, a text without a mask token)."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file or folder the user named is not there or is not what it should be."""


class InputFileExistsError(InputError, FileExistsError):
    """A destination the user named already holds something that would be replaced."""


class MissingDependencyError(InputError, ImportError):
    """An optional package the requested feature needs is not installed."""
