"""Crash safety of ReMixer on the real vLLM engine: an uninterrupted run, and a run killed (SIGKILL,
engine processes included) in the middle of a stage then re-run, must write the same records.

    python benchmarks/remixer_crash_check.py --work-root DIR [--kill-stage annotations]
        [--kill-after-shards 1] -- REMIXER_SCIFACT_ARGS...

Runs ``benchmarks/remixer_scifact.py`` (same interpreter; the synthesis environment) three times
under ``DIR``: ``a`` uninterrupted; ``b`` killed as soon as ``--kill-after-shards`` shards of
``--kill-stage`` are complete, then ``b`` again, which resumes. Small shards (``shard_size``
4 unless the arguments set it) give the stage several of them. Sampling is greedy
(``temperature=0`` for every generating stage): vLLM's CPU engine cannot take per-request seeds,
and an engine seeded once draws differently after a restart, so sampled text could only repeat
itself on a backend with per-request seeds. Prints, per stage, whether the final files are
byte-identical, and how many shards of the killed stage the resumed run redid (at most one may
be lost).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
STAGES = ("sources", "queries", "candidates", "annotations", "split", "nv_negatives", "reasoning")
GREEDY = [f"{s}.sampling.temperature=0" for s in ("queries", "annotation", "reasoning")]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-root", required=True)
    p.add_argument("--kill-stage", default="annotations", choices=STAGES[1:])
    p.add_argument("--kill-after-shards", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args = p.parse_args(own)
    if any(a.startswith("--work-dir") for a in rest):
        p.error("--work-dir is set by this script (under --work-root)")
    return args, rest


def _command(work: pathlib.Path, rest: list[str]) -> list[str]:
    sets = [a for g in GREEDY for a in ("--set", g)]
    if not any(a.startswith("shard_size=") for a in rest):
        sets += ["--set", "shard_size=4"]
    return [sys.executable, str(HERE / "remixer_scifact.py"), "--work-dir", str(work), *rest,
            *sets]


def _run(cmd: list[str], log: pathlib.Path, timeout: float) -> int:
    with open(log, "ab") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode


def _done_shards(stage_dir: pathlib.Path) -> list[str]:
    return sorted(p.name for p in stage_dir.glob("shard-*.stats.json"))


def _run_and_kill(cmd: list[str], log: pathlib.Path, stage_dir: pathlib.Path, shards: int,
                  timeout: float) -> tuple[bool, list[str]]:
    """Starts ``cmd`` in its own process group and SIGKILLs the group once ``shards`` shards of
    the stage are complete. Returns (killed, shards complete at the kill)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            done = _done_shards(stage_dir)
            if len(done) >= shards:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True, done
            time.sleep(0.5)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise SystemExit(f"run b did not reach {shards} shard(s) of {stage_dir.name} in time")
    return False, _done_shards(stage_dir)


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    root = pathlib.Path(args.work_root)
    root.mkdir(parents=True, exist_ok=True)
    log = root / "log.txt"
    t0 = time.perf_counter()
    if _run(_command(root / "a", rest), log, args.timeout) != 0:
        raise SystemExit(f"uninterrupted run failed; see {log}")
    t_a = time.perf_counter() - t0
    stage_dir = root / "b" / args.kill_stage
    t0 = time.perf_counter()
    killed, done_at_kill = _run_and_kill(_command(root / "b", rest), log, stage_dir,
                                         args.kill_after_shards, args.timeout)
    if not killed:
        raise SystemExit(f"run b finished before {args.kill_after_shards} shard(s) of "
                         f"{args.kill_stage} were complete: use smaller shards or more sources")
    before = {n: (stage_dir / n).stat().st_mtime_ns for n in done_at_kill}
    if _run(_command(root / "b", rest), log, args.timeout) != 0:
        raise SystemExit(f"resumed run failed; see {log}")
    t_b = time.perf_counter() - t0
    kept = [n for n in done_at_kill if (stage_dir / n).stat().st_mtime_ns == before[n]]
    total = _done_shards(stage_dir)
    rows = []
    for stage in STAGES:
        a, b = root / "a" / stage / "final.jsonl", root / "b" / stage / "final.jsonl"
        same = a.exists() and b.exists() and a.read_bytes() == b.read_bytes()
        lines = len(a.read_text(encoding="utf-8").splitlines()) if a.exists() else 0
        rows.append({"stage": stage, "records": lines, "identical": same})
    report = {"kill_stage": args.kill_stage, "shards_in_stage": len(total),
              "shards_complete_at_kill": len(done_at_kill), "shards_kept": len(kept),
              "shards_redone": len(total) - len(kept), "uninterrupted_s": round(t_a, 1),
              "killed_and_resumed_s": round(t_b, 1), "stages": rows,
              "load_avg": [round(x, 2) for x in os.getloadavg()]}
    (root / "report.json").write_text(json.dumps(report, indent=1))
    print("| stage | records | resumed == uninterrupted |\n|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['records']} | {'yes' if r['identical'] else 'NO'} |")
    print(f"killed in {args.kill_stage} with {len(done_at_kill)} of {len(total)} shards "
          f"complete; the resumed run kept {len(kept)} and redid {len(total) - len(kept)}; "
          f"load average {report['load_avg']}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
