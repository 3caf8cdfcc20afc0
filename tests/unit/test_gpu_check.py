"""scripts/gpu_check.py --cpu-smoke: the GPU check end to end on CPU (debug model, fp32), and what it writes."""

import importlib.util
import json
import pytest
import os
import subprocess
import sys
from pathlib import Path

from trainer.config import load_config
from trainer.dry_run import dry_run

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_rows_are_valid_configs_for_cuda():
    # What the GPU run would train, planned for one CUDA device here (DRY_RUN's path): a mistake in a row's settings
    # shows now, not in the few minutes of GPU time.
    pytest.importorskip("torchao.float8")
    gc = _gpu_check()
    rows = gc.plan_rows(gc.GPU)
    assert len(rows) == 18 and {(r.seq, r.batch) for r in rows} == {(2048, 8), (8192, 2)}
    for row in (r for r in rows if r.runner == "trainer"):
        flags = {"job.config_file": ROOT / "configs/debug_model.toml", "model.flavor": row.flavor,
                 "training.seq_len": row.seq, "training.local_batch_size": row.batch,
                 "training.mixed_precision_param": gc.GPU.dtype, **gc.trainer_overrides(row, gc.GPU, 989e12)}
        cfg = load_config([a for k, v in flags.items() for a in (f"--{k}", str(v))])
        assert "dry run OK" in dry_run(cfg, 1, target="cuda"), row.name


@pytest.mark.slow  # about 25 s on 2 cores
def test_cpu_smoke_run_writes_every_row_and_check(tmp_path):
    # A budget and per-process limits (240 s a row or check; the async checkpoint check's two runs 120 s each) that
    # a loaded 2-core machine stays well within.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path),
                           "--budget-s", "480"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
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
