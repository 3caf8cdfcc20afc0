"""The profiling schedule in one process: which steps write traces, resume alignment, cut-off windows, and the
CUDA memory snapshots (their private torch calls replaced by recorders, since this CPU build has none)."""

import json

import pytest
import torch

from trainer import torch_private
from trainer.config import JobConfig
from trainer.profiling import maybe_profile

CPU = torch.device("cpu")


def _cfg(tmp_path, freq=3, warmup=1, active=1, traces=True, memory=False) -> JobConfig:
    cfg = JobConfig()
    cfg.job.dump_folder = str(tmp_path)
    p = cfg.profiling
    p.enable_profiling, p.enable_memory_snapshot = traces, memory
    p.profile_freq, p.profiler_warmup, p.profiler_active = freq, warmup, active
    return cfg


def _train(cfg, steps: range, device=CPU, log=print, fail_at: int | None = None) -> None:
    """A stand-in training loop: `steps` are the global step numbers run, as Trainer.train numbers them."""
    x = torch.randn(64, 64)
    with maybe_profile(cfg, rank=0, device=device, start_step=steps.start - 1, log=log) as profiler:
        for step in steps:
            if step == fail_at:
                raise torch.OutOfMemoryError("fake OOM")
            x = torch.tanh(x @ x)
            profiler.step()


def _written(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("freq,warmup,active,steps,expected", [
    (3, 1, 1, range(1, 8), [3, 6]),
    (3, 0, 3, range(1, 7), [3, 6]),  # every step recorded, no wait
    (4, 0, 2, range(1, 8), [4]),  # steps 7-8 would be the next window: cut off at 7, not written
    (3, 1, 1, range(3, 8), [3, 6]),  # resumed after step 2: windows stay on multiples of profile_freq
    (5, 3, 1, range(1, 5), []),
])
def test_traces_only_at_multiples_of_freq(tmp_path, freq, warmup, active, steps, expected):
    _train(_cfg(tmp_path, freq, warmup, active), steps)
    assert _written(tmp_path) == [f"profile_traces/iteration_{n}/rank0_trace.json" for n in expected]


def test_trace_is_chrome_json_with_the_recorded_steps(tmp_path):
    _train(_cfg(tmp_path, freq=3, warmup=1, active=2), range(1, 4))
    events = json.loads((tmp_path / "profile_traces/iteration_3/rank0_trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"ProfilerStep#1", "ProfilerStep#2"} <= names and "ProfilerStep#0" not in names  # steps 2, 3
    assert "aten::mm" in names


def test_memory_snapshots_on_schedule_and_on_oom(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch_private, "record_cuda_memory_history", lambda enabled: calls.append(enabled))

    def dump(path):
        calls.append(path)
        open(path, "wb").close()

    monkeypatch.setattr(torch_private, "dump_cuda_memory_snapshot", dump)
    with pytest.raises(torch.OutOfMemoryError):
        _train(_cfg(tmp_path, freq=2, traces=False, memory=True), range(1, 8), device=torch.device("cuda"), fail_at=6)
    assert _written(tmp_path) == [f"memory_snapshot/{d}/rank0_memory_snapshot.pickle"
                                  for d in ("iteration_2", "iteration_4", "iteration_6_exit")]
    assert calls[0] is True and calls[-1] is False  # history recorded from the start, stopped at the end


def test_memory_snapshot_on_cpu_warns_once_and_trains(tmp_path):
    lines = []
    _train(_cfg(tmp_path, freq=2, traces=False, memory=True), range(1, 5), log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: profiling.enable_memory_snapshot = true has no effect")
    assert _written(tmp_path) == []
