"""A fork server for hub processes: import the hub once, fork a fresh one per start.

Usage: ``python hub_forkserver.py [--prepare FILE:FUNCTION]``, driven over stdin/stdout by
:class:`cluster.ForkServer`, one JSON object per line each way.

Why: importing ``syncengine.cli`` costs about a second of CPU, and the kill loops restart
hubs a hundred times a run on a two-core machine. Here the import is paid once; each start
is a ``fork`` of this process that runs the very command line of a hub,
``syncengine.cli.main(["hub", "run", "--config", FILE])``, in a fresh child: its own
environment (crash points re-read from it), its own random stream (crash points roll dice),
stdout and stderr appended to its own log. No event loop, thread or connection exists here
before the fork.

``--prepare FILE:FUNCTION`` runs ``FUNCTION()`` of that file once before serving: how a
deliberately broken build (``broken_hub.py:disable_dedup``) is loaded.

Requests and answers::

    {"op": "spawn", "argv": [...], "env": {...}, "log": PATH}  -> {"pid": PID}
    {"op": "kill", "pid": PID}       -> {"killed": true|false}  (SIGKILL, reaped)
    {"op": "term", "pid": PID}       -> {"sent": true|false}    (SIGTERM)
    {"op": "status", "pid": PID}     -> {"status": null | exit code (-9 after SIGKILL)}

Children are reaped only while a request is handled, so a child that died is a zombie until
then and its pid cannot be reused: ``kill`` never signals a stranger. At end of input every
child still running is killed and reaped.
"""

from __future__ import annotations

import json
import os
import random
import runpy
import signal
import sys
import traceback
from typing import Any

# What every hub start saves: imported once, here, before any fork.
from syncengine import crashpoints
from syncengine.cli import main


def _fork_hub(argv: list[str], env: dict[str, str], log: str) -> int:
    pid = os.fork()
    if pid:
        return pid
    code: Any = 1
    try:
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        os.environ.clear()
        os.environ.update(env)
        random.seed()
        crashpoints.reload()
        sys.argv = ["syncengine", *argv]
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(prepare: str | None) -> None:
    if prepare:
        path, _, function = prepare.rpartition(":")
        runpy.run_path(path, run_name="__prepare__")[function]()
    live: set[int] = set()
    exited: dict[int, int] = {}

    def reap() -> None:
        for pid in list(live):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                live.discard(pid)
                exited[pid] = os.waitstatus_to_exitcode(status)

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer({"ready": os.getpid()})
    try:
        for line in sys.stdin:
            reap()
            req = json.loads(line)
            op, pid = req["op"], req.get("pid")
            if op == "spawn":
                pid = _fork_hub(req["argv"], req["env"], req["log"])
                live.add(pid)
                answer({"pid": pid})
            elif op == "kill":
                killed = pid in live
                if killed:
                    os.kill(pid, signal.SIGKILL)
                    exited[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                    live.discard(pid)
                answer({"killed": killed})
            elif op == "term":
                if pid in live:
                    os.kill(pid, signal.SIGTERM)
                answer({"sent": pid in live})
            elif op == "status":
                answer({"status": None if pid in live else exited.get(pid)})
            else:
                answer({"error": f"unknown op {op!r}"})
    finally:
        for pid in live:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    args = sys.argv[1:]
    serve(args[1] if args[:1] == ["--prepare"] else None)
