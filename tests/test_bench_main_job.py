"""experiments.bench_main_job: the main job timed in a child process, its evaluations read back."""
from experiments import bench_main_job


def test_the_main_job_row_has_the_childs_times_and_every_evaluation():
    # Batch 8: the child inherits conftest's 8 CPU devices.
    rows, notes = bench_main_job.run(["--num-steps", "4", "--eval-every", "2", "--batch-size",
                                      "8", "--eval-examples", "8", "--log-every", "2"])
    (row,) = rows
    assert float(row["user s"]) > 0 and row["wall"].endswith(" s")
    steps = [entry.split("(")[1].rstrip(")") for entry in row["validation mAP (step)"].split(", ")]
    assert steps == ["2", "4"]
    assert "--num-steps 4" in notes[0]
