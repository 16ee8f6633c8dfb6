"""Where calls come from: named once per test, cell or script, never per call.

A session given no ``source`` names the running pytest test (its node id), the notebook cell
(``analysis.ipynb cell 3``), else the script (``batch.py``), and follows it: a session that
lives across tests or cells (``enable()`` in a notebook, or in code a test runs) is renamed
when the surface that knows says a new one started (:func:`enter`, by the pytest plugin
before each test and by an IPython hook before each cell). A call only reads the name its
session's core already holds.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Any

from ..core.options import MAX_SOURCE_CHARS

_lock = threading.Lock()
_following: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions (this module imports none)
_contexts: list[str] = []  # what surfaces said is running, innermost last
_shells_followed: weakref.WeakSet[Any] = weakref.WeakSet()  # IPython shells whose cells rename sources


def detect() -> str:
    """The name of what runs now: the test or cell a surface said runs, the notebook cell, or the script.

    Not $PYTEST_CURRENT_TEST: a script a test starts inherits it, and is still a script.
    """
    with _lock:
        if _contexts:
            return _contexts[-1]
    shell = _ipython_shell()
    if shell is not None:
        follow_cells(shell)
        return cell_name(shell)
    return script_name()


def script_name(argv: list[str] | None = None) -> str:
    argv = sys.argv if argv is None else argv
    first = argv[0] if argv else ""
    if first in ("", "-"):
        return "python"
    if first == "-c":
        return "python -c"
    return os.path.basename(first) or first


def fit(name: str) -> str:
    """``name`` as a ``source`` accepts it: on one line of printable characters, at most ``MAX_SOURCE_CHARS``.

    A long name (a test's node id with a long parameter) loses its middle, not its ends: the start
    names the file and test, the end tells its parameters apart.
    """
    text = "".join(char if char.isprintable() else " " for char in name).strip()
    if len(text) <= MAX_SOURCE_CHARS:
        return text
    head = (MAX_SOURCE_CHARS - 1) // 2
    return f"{text[:head]}…{text[len(text) - (MAX_SOURCE_CHARS - 1 - head) :]}"


def follow(session: Any) -> None:
    """Rename ``session``'s source whenever a new test or cell starts."""
    with _lock:
        _following.add(session)


def enter(name: str) -> None:
    """A test or a cell named ``name`` starts: sessions that follow take its name until :func:`leave`."""
    name = fit(name)
    with _lock:
        _contexts.append(name)
        following = list(_following)
    for session in following:
        session.core.source = name


def leave(name: str) -> None:
    """The test or cell ``name`` ended: following sessions take the name of what runs around it, if anything."""
    name = fit(name)
    with _lock:
        for index in range(len(_contexts) - 1, -1, -1):
            if _contexts[index] == name:
                del _contexts[index]
                break
        outer = _contexts[-1] if _contexts else None
        following = list(_following) if outer is not None else []
    for session in following:
        session.core.source = outer


# -- IPython -----------------------------------------------------------------------------------------------


def _ipython_shell() -> Any:
    if "IPython" not in sys.modules:
        return None  # never import IPython to find out
    from IPython.core.interactiveshell import InteractiveShell

    return InteractiveShell.instance() if InteractiveShell.initialized() else None


def notebook_name(shell: Any) -> str:
    """The notebook's file name where the front end tells it (VS Code, Jupyter Server), else what runs it."""
    path = shell.user_ns.get("__vsc_ipynb_file__") or os.environ.get("JPY_SESSION_NAME")
    if isinstance(path, str) and path:
        return os.path.basename(path)
    return "notebook" if type(shell).__name__ == "ZMQInteractiveShell" else "ipython"


def cell_name(shell: Any) -> str:
    # The running cell's number (In [3]): IPython counts it before or after the cell depending on its
    # version, and the display hook, which numbers Out[3], knows which.
    number = getattr(getattr(shell, "displayhook", None), "prompt_count", None)
    return f"{notebook_name(shell)} cell {shell.execution_count if number is None else number}"


def follow_cells(shell: Any) -> None:
    """Name each cell of ``shell`` as it starts (once per shell)."""
    with _lock:
        if shell in _shells_followed:
            return
        _shells_followed.add(shell)
    started: list[str] = []

    def pre_run_cell(info: Any) -> None:
        name = cell_name(shell)
        started.append(name)
        enter(name)

    def post_run_cell(result: Any) -> None:
        if started:
            leave(started.pop())

    shell.events.register("pre_run_cell", pre_run_cell)
    shell.events.register("post_run_cell", post_run_cell)
