"""scripts/gpu_check.py --cpu-smoke: the GPU check end to end on CPU (debug model, fp32), and what it writes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_smoke_run_writes_every_row_and_check(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path),
                           "--budget-s", "200"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    report = json.loads((tmp_path / "gpu.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    float8 = "debugmodel seq 64 float8 trainer"
    assert set(rows) == {"debugmodel seq 64 fp32 trainer", "debugmodel seq 64 fp32 plain", float8}
    if importlib.util.find_spec("torchao") is None:  # the float8 extra is missing: that row alone fails, in one line
        assert rows.pop(float8)["status"] == "failed"
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row, proc.stderr[-3000:])
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and 0 < row["mfu_pct"] < 100 and row["memory_gib"] > 0
    assert rows["debugmodel seq 64 fp32 trainer"]["trainer_over_plain"] > 0
    assert rows["debugmodel seq 64 fp32 trainer"]["command"].startswith("NGPU=1")
    checks = report["checks"]
    assert len(checks) == 3 and all(c["status"] == "pass" for c in checks.values()), checks
    markdown = (tmp_path / "gpu.md").read_text()
    assert "| model | seq | batch | precision | runner | tokens/s |" in markdown
    assert all(name in markdown for name in checks) and "CPU smoke run" in markdown
    assert proc.returncode == (0 if len(rows) == 3 else 1), proc.stdout[-3000:] + proc.stderr[-3000:]
