"""Optional parts of mmca and the packages they need: the library and the CLI install without
the web server or the plotting stack, and a command that needs one says which extra to add."""

from __future__ import annotations

from importlib.util import find_spec

from mmca.errors import MmcaError

# extra -> the top-level modules it installs (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn"),
    "plots": ("matplotlib",),
}


class MissingExtra(MmcaError):
    """A command needs an optional package that is not installed."""


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    return [name for name in EXTRAS[extra] if find_spec(name) is None]


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtra naming the extra to install when `what` needs a package that is absent."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(f"{what} needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} "
                           "not installed", f"pip install 'mmca[{extra}]'")
