"""The main job, timed as a new user runs it: `python -m experiments.bench_main_job`.

Runs README's first command's training, `python -m experiments.train_voc --dataset shapes`,
from scratch in a fresh process (into a temporary --workdir, so runs/shapes is left alone) and
reports its wall time, CPU time, page faults and peak memory from the operating system's own
accounting of the finished child (what `/usr/bin/time -v` prints), with the validation mAP of
every evaluation from its metrics.jsonl. Compilation and the evaluations are included; the
install is not. Goal (issue 13): mAP >= 0.90 in <= 5 minutes on a 2-core CPU.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.benchlib import machine_info, print_table

COMMAND = [sys.executable, "-m", "experiments.train_voc", "--dataset", "shapes"]


def run(extra_args=()) -> tuple[list[dict], list[str]]:
    """One run of the main job: a table row and a note naming the command."""
    with tempfile.TemporaryDirectory() as workdir, tempfile.TemporaryFile("w+") as errors:
        command = COMMAND + ["--workdir", workdir, *extra_args]
        start = time.monotonic()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage, as time -v reads it
        wall = time.monotonic() - start
        if os.waitstatus_to_exitcode(status):
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{errors.read()[-2000:]}")
        evaluations = [record for record in map(json.loads,
                                                (Path(workdir) / "metrics.jsonl").open())
                       if "map" in record]
    cpu = usage.ru_utime + usage.ru_stime
    row = {"job": "shapes, ssd_mini from scratch",
           "wall": f"{int(wall // 60)} min {wall % 60:.0f} s",
           "CPU %": f"{100 * cpu / wall:.0f}",
           "user s": f"{usage.ru_utime:.0f}", "system s": f"{usage.ru_stime:.1f}",
           "minor faults": f"{usage.ru_minflt / 1e6:.2f} M",
           "peak memory": f"{usage.ru_maxrss / 2**20:.2f} GB",
           "validation mAP (step)": ", ".join(f"{r['map']:.4f} ({r['step']})"
                                              for r in evaluations)}
    note = (f"`python {' '.join(COMMAND[1:] + list(extra_args))}` (--workdir a fresh "
            "temporary folder): compilation and every evaluation included; mAP is VOC2007 "
            "11-point at IoU 0.5 on the validation images. Goal: mAP >= 0.90 in <= 5 min. "
            "No peer runs this job.")
    return [row], [note]


def main() -> None:
    print(machine_info())
    rows, notes = run(sys.argv[1:])
    print_table(rows)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
