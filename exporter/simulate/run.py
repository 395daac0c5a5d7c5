"""Run any nvidia-ml-py program on a simulated fleet, unchanged, in this Python process.

    python -m exporter.simulate.run SCENARIO -- CMD [ARGS...]

The simulator replaces the NVML library beneath pynvml (``pynvml.nvmlLib``), which only affects the
process it is installed in; so the target runs *here*, after ``install()``, instead of being exec'd.
CMD is resolved, in order, as:

- ``-m MODULE``: ``runpy.run_module(MODULE)`` as ``__main__`` (like ``python -m``);
- a path to a Python file: ``runpy.run_path`` (like ``python FILE``);
- the name of an installed console script (``[project.scripts]`` / ``console_scripts`` entry point,
  e.g. ``nvitop-exporter``): its entry point is loaded and called, like the generated wrapper does;
- a program on PATH whose first line is a Python shebang: run as a Python file.

Anything else (a compiled binary, a shell script) cannot be simulated in-process and is refused with
a message. ``sys.argv`` is set to CMD's argv as the target expects. Exit status is the target's.
``--list`` prints the shipped scenarios.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import shutil
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from exporter.simulate import ScenarioError, install, load_scenario, shipped_scenarios

log = logging.getLogger("exporter.simulate.run")

USAGE = "python -m exporter.simulate.run [--list] [--log-level LEVEL] SCENARIO -- CMD [ARGS...]"


class RunError(Exception):
    """The command line cannot be run on the simulator; the message says why."""


def resolve(cmd: Sequence[str]) -> tuple[Callable[[], object], list[str]]:
    """Turn CMD into (a callable that runs it in this process, the argv it should see)."""
    if not cmd:
        raise RunError("missing command after `--` (e.g. `-- nvitop-exporter --port 9100`)")
    head = cmd[0]
    if head == "-m":
        if len(cmd) < 2:
            raise RunError("`-m` needs a module name")
        module = cmd[1]
        return (lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)), [module, *cmd[2:]]
    as_path = Path(head)
    if head.endswith(".py") or (os.sep in head and as_path.is_file()):
        if not as_path.is_file():
            raise RunError(f"{head}: no such Python file")
        return _run_file(as_path), [head, *cmd[1:]]
    entry = _console_script(head)
    if entry is not None:
        return _run_entry_point(entry), [head, *cmd[1:]]
    found = shutil.which(head)
    if found is None:
        raise RunError(f"{head}: not a module (-m), Python file, installed console script or program on PATH")
    if not _is_python_script(Path(found)):
        raise RunError(f"{head} ({found}) is not a Python program; the simulator can only stand in for NVML "
                       "inside a Python process that uses nvidia-ml-py")
    return _run_file(Path(found)), [found, *cmd[1:]]


def _console_script(name: str) -> metadata.EntryPoint | None:
    matches = metadata.entry_points(group="console_scripts", name=name)
    return next(iter(matches), None)


def _run_entry_point(entry: metadata.EntryPoint) -> Callable[[], object]:
    def run() -> object:
        return entry.load()()

    return run


def _run_file(path: Path) -> Callable[[], object]:
    def run() -> object:
        sys.path.insert(0, str(path.resolve().parent))
        return runpy.run_path(str(path), run_name="__main__")

    return run


def _is_python_script(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            first = f.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def main(argv: Sequence[str] | None = None) -> int | str | None:
    """Parse our arguments, install the scenario, run the target; return its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    ours, cmd = (args[: args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    parser = argparse.ArgumentParser(
        prog="python -m exporter.simulate.run", usage=USAGE,
        description="Run an nvidia-ml-py program (e.g. nvitop-exporter) on a simulated GPU fleet.",
        epilog="Shipped scenarios: " + ", ".join(shipped_scenarios()),
    )
    parser.add_argument("scenario", nargs="?", help="shipped scenario name or scenario file (YAML/TOML)")
    parser.add_argument("--list", action="store_true", help="print the shipped scenarios and exit")
    parser.add_argument("--log-level", default="WARNING", help="simulator log level (default WARNING)")
    opts = parser.parse_args(ours)
    if opts.list:
        for name in shipped_scenarios():
            print(f"{name}: {load_scenario(name).description}")
        return 0
    if not opts.scenario:
        parser.error("missing SCENARIO")
    if "--" not in args:
        parser.error("missing `-- CMD [ARGS...]` (the program to run on the simulated fleet)")
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        scenario = load_scenario(opts.scenario)
        target, target_argv = resolve(cmd)
    except (ScenarioError, RunError) as exc:
        print(f"exporter.simulate.run: error: {exc}", file=sys.stderr)
        return 2
    install(scenario)
    sys.argv = target_argv
    result = target()
    # Entry points return their exit status (for sys.exit); runpy returns the module's globals.
    return result if isinstance(result, int | str) else None


if __name__ == "__main__":
    sys.exit(main())
