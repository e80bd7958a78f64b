"""Worker scripts in child processes forked from an interpreter that has imported torch and gradstore already.

A fresh ``python worker.py`` spends 3-4 s of CPU importing torch and gradstore before its first line of work; the
crash/resume and multi-rank tests start a dozen such workers. :func:`spawn` forks them instead from a
multiprocessing forkserver that imported those modules once (the forkserver only imports: no torch thread pool
is started before the fork). The child is still its own process, killed by its own SIGKILL: it runs ``script`` as
``__main__`` with the ``sys.argv``, ``sys.path[0]``, working directory and environment that ``python script args``
would give it, its stdout and stderr (file descriptors 1 and 2, so C-level output too) going to files that
:meth:`Child.communicate` returns, as ``subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)`` would.
``OMP_NUM_THREADS`` in the environment sets torch's thread count, as it does when torch is imported.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from multiprocessing.context import ForkServerContext
from pathlib import Path

PRELOAD = ["numpy", "torch", "zarr", "gradstore.logger", "gradstore.store"]

_context: ForkServerContext | None = None


def _forkserver() -> ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)  # applies when the forkserver starts (at the first spawn)
    return _context


def _run(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """The child: as ``cd cwd && env -i env python script args > out 2> err``, its imports already done."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class Child:
    """A spawned worker, with the parts of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, script: Path, args: tuple[str, ...], env: dict[str, str] | None, cwd: Path | None):
        self.args = [str(script), *args]
        self._dir = Path(tempfile.mkdtemp(prefix="gradstore-child-"))
        self._out, self._err = self._dir / "stdout", self._dir / "stderr"
        environment = dict(os.environ if env is None else env)
        where = str(cwd if cwd is not None else Path.cwd())
        self._process = _forkserver().Process(
            target=_run, args=(str(script), list(args), environment, where, str(self._out), str(self._err))
        )
        self._process.start()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status; ``-N`` for a child ended by signal ``N`` (as Popen's)."""
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the child; its whole stdout and stderr."""
        self.wait(timeout)
        try:
            return self._out.read_text(errors="replace"), self._err.read_text(errors="replace")
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self) -> None:
        self._process.kill()


def spawn(script: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Child:
    """Run ``python script *args`` (environment ``env``, default this process's; in ``cwd``) as a forked child."""
    return Child(script, args, env, cwd)
