"""Running one step of the check: a subprocess with its own time limit, its
output appended to the check's log as it is written (so a check killed
from outside still leaves it), killed with its whole process group when
the limit is reached (pytest's workers, inductor's compile workers)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

from .plan import Step

TAIL_CHARS = 6000


def run_step(step: Step, timeout: float, cwd: str, env: dict[str, str], log_path: str) -> dict:
    """Run `step` for at most `timeout` seconds; its entry for the record."""
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        log.write(f"\n== {step.name} (limit {timeout:.0f} s): {shlex.join(step.argv)}\n")
        log.flush()
        start_offset = log.tell()
        t0 = time.time()
        rc: int | None = None
        try:
            # Its own process group (not a new session: the device tool ends
            # whatever a command leaves behind, and a new session would escape it).
            proc = subprocess.Popen(step.argv, cwd=cwd, env={**os.environ, **step.env, **env}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=0)
        except OSError as exc:
            status = f"could not start ({type(exc).__name__}: {exc})"
        else:
            try:
                rc = proc.wait(timeout=timeout)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                status = f"timed out after {timeout:.0f} s"
        seconds = time.time() - t0
        log.write(f"== {step.name}: {status} in {seconds:.1f} s\n")
    output = read_from(log_path, start_offset)
    return {"step": step.name, "status": status, "exit_code": rc, "seconds": round(seconds, 1),
            "timeout_s": round(timeout, 1), "estimate_s": round(step.estimate.seconds, 1),
            "command": shlex.join(step.argv), "env": step.env, "output_tail": output[-TAIL_CHARS:],
            "_output": output}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def read_from(path: str, offset: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return ""


_OUTCOME = re.compile(r"(?:(?P<id1>\S+::\S+)\s+(?P<o1>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)"
                      r"|(?:\b(?P<o2>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(?P<id2>\S+::\S+))")


def test_outcomes(output: str) -> dict:
    """Counts of pytest -v outcomes in a step's output ("tests/x.py::t PASSED"
    without workers, "[gw0] [ 5%] PASSED tests/x.py::t" with them), the node
    ids that failed, and compute-sanitizer's error count where it ran. Read
    line by line, so a run cut short still counts what finished."""
    counts: dict[str, int] = {}
    failed: list[str] = []
    seen: set[tuple[str, str]] = set()
    for line in output.splitlines():
        m = _OUTCOME.search(line)
        if not m:
            continue
        node = m.group("id1") or m.group("id2")
        outcome = m.group("o1") or m.group("o2")
        if (node, outcome) in seen:  # the -rfE summary repeats failures
            continue
        seen.add((node, outcome))
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failed.append(node)
    out = {"counts": counts, "failed": failed[:50], "failed_total": len(failed)}
    summary = _SANITIZER.findall(output)
    if summary:
        out["sanitizer_errors"] = int(summary[-1])
    return out


# compute-sanitizer's last line: "========= ERROR SUMMARY: 0 errors"
_SANITIZER = re.compile(r"ERROR SUMMARY: (\d+) error")
