"""``python -m attribution.jobs``: run, start, list and cancel a run's long jobs from a shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attribution.errors import UserError
from attribution.job_kinds import KINDS
from attribution.jobs import cancel, describe, execute, list_jobs, start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attribution.jobs",
                                     description="Run, start, watch and cancel long jobs of a run directory.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "run a job in the foreground (Ctrl-C cancels; run again to resume)"),
                        ("start", "start a job as a detached background process"),
                        ("exec", argparse.SUPPRESS)):
        p = sub.add_parser(name, help=help_)
        p.add_argument("kind", choices=list(KINDS))
        p.add_argument("--run", required=True, help="run directory (for train: the output directory)")
        p.add_argument("--args", default="{}", help="job arguments as JSON")
        if name == "exec":
            p.add_argument("--meta", default="{}", help=argparse.SUPPRESS)
    p = sub.add_parser("list", help="list a run's jobs")
    p.add_argument("--run", required=True)
    p = sub.add_parser("cancel", help="cancel a running job")
    p.add_argument("--run", required=True)
    p.add_argument("id")
    a = parser.parse_args(argv)
    try:
        if a.cmd in ("run", "start", "exec"):
            try:
                args = json.loads(a.args)
            except json.JSONDecodeError as exc:
                raise UserError(f"--args must be JSON ({exc})") from None
            if a.cmd == "start":
                print(start(a.kind, Path(a.run), args, mode="process"))
                return 0
            meta = json.loads(a.meta) if a.cmd == "exec" else {}
            state = execute(a.kind, Path(a.run), args, mode="process" if a.cmd == "exec" else "foreground", **meta)
            print(json.dumps({k: state[k] for k in ("id", "status", "error", "result")}))
            return 0 if state["status"] == "done" else 2
        if a.cmd == "list":
            for s in list_jobs(Path(a.run)):
                print(f"{s['id']}  {s['status']:<11}  {describe(s)}")
            return 0
        ok = cancel(Path(a.run), a.id)
        print("cancel requested" if ok else f"job {a.id} is not running")
        return 0 if ok else 1
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
