"""bench/gpu_speed.py runs end to end on a CPU with --tiny (its GPU run happens on a lent machine,
bench/gpu_check.sh): the random model is built, the data prepared, each run is its own process, and
the table names what did not run and why. TRL is a bench-only dependency, so CI runs tunesmith alone
(the refusal of a fused loss on a CPU is tests/test_kernels.py's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
def test_gpu_speed_runs_end_to_end_on_a_cpu_with_tiny_shapes(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept\n")
    done = subprocess.run([sys.executable, "gpu_speed.py", "--tiny", "--lengths", "512", "--steps", "2",
                           "--runs", "tunesmith,unsloth", "--work-dir", str(tmp_path / "work"),
                           "--results", str(results)], cwd=BENCH, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nkept\n") and "<!-- gpu_speed:begin -->" in text
    assert "### Sequence length 128: 4 rows per step" in text
    row = re.search(r"^\| tunesmith \| defaults: [^|]*\| ([\d,]+) \| ([\d,]+) \| n/a \| ([\d.]+) \| n/a \|", text,
                    re.MULTILINE)  # MFU n/a: --tiny measures no peak
    assert row and int(row[1].replace(",", "")) > 0 and int(row[2].replace(",", "")) > 0, text
    assert "| unsloth |" in text and "not run: Unsloth is not installed here" in text
    log = (tmp_path / "work" / "seq128" / "tunesmith" / "child.log").read_text()
    assert "Attention over packed rows: per_example" in log
