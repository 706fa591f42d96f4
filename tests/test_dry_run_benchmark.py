"""benchmarks/dry_run.py runs end to end on the embedded config (one repeat), so the yardsticks BENCHMARKS.md
reads the dry-run target against cannot rot; no timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.workflow
def test_dry_run_benchmark_times_the_grid_beside_a_flat_dag_of_as_many_jobs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dry_run.py"), "--configfile", "config/embedded.yaml",
                           "--repeats", "1", "--shim-scontrol", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "dry-run.json").read_text())
    assert result["jobs"] > 50  # the embedded study's plan, counted from the dry run's own total
    assert set(result["seconds"]) == {"grid", "grid_slurm_profile", "flat", "one_rule"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["seconds"].values())
    # The collector probe sees CPython's default threshold while Snakemake imports, then the Snakefile's own
    # (BENCHMARKS.md, "Dry run"); the embedded DAG is too small to reach a full collection at either, so the
    # second check only guards against one appearing.
    collector = result["grid_collector"]
    default, workflow = str(collector["threshold_at_start"][0]), str(collector["threshold_at_exit"][0])
    assert int(workflow) > int(default) and collector["by_threshold"][default]["collections"][0] > 0
    assert collector["by_threshold"].get(workflow, {"collections": [0, 0, 0]})["collections"][2] == 0
    assert result["grid_over_flat"] > 0 and result["flat_ms_per_job_over_start"] == pytest.approx(
        1000 * (result["median_s"]["flat"] - result["median_s"]["one_rule"]) / result["jobs"])
