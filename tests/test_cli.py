"""The command line: check and bench run and report."""

import json
import subprocess
import sys
import time

import torch


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dlcv_fast", *args], capture_output=True,
                          text=True, timeout=600)


def test_check_passes_and_prints_a_table():
    out = _run("check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "max_pool2d   cpu" in out.stdout
    assert "FAIL" not in out.stdout
    assert " 0 failed" in out.stdout


def test_bench_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    device_batch = "2" if not torch.cuda.is_available() else "8"
    out = _run("bench", "--op", "max_pool2d", "--dtype", "fp32", "--batch", device_batch,
               "--json", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(path.read_text())
    assert data["copy_gbps"] > 0
    assert {"device", "torch", "cuda", "triton", "commit", "date"} <= set(data["environment"])
    rows = data["results"]
    assert {r["case"] for r in rows} >= {"alexnet.pool1", "vgg16.pool1", "resnet50.pool"}
    assert {r["direction"] for r in rows} == {"forward", "backward"}
    assert all(r["ms"] > 0 and r["torch_ms"] > 0 and r["gbps"] > 0 for r in rows)
    assert "speedup" in out.stdout


def test_model_benchmark_times_both_models():
    """The whole-model benchmark (run by `bench --op models`), on a small case: it checks
    dlcv_fast's model against torchvision's before timing, and counts the step's FLOPs."""
    from dlcv_fast import bench

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = bench.default_backends(device)
    rows = list(bench.bench_models(device, [torch.float32], 2, backends,
                                   cases=[("resnet18", "train step", 1, 32, "channels_last")],
                                   budget_s=0.1))
    assert [r.backend for r in rows] == backends
    # ResNet-18 at 32x32: about 74 MFLOP an image forward, twice that backward; 2 images.
    assert all(3e8 < r.flops < 6e8 and r.ms > 0 and r.torch_ms > 0 for r in rows)
    assert all(r.direction == "train step" and r.shape == (2, 3, 32, 32) for r in rows)


def test_cpu_timings_run_in_turns():
    """median_ms_many times its functions in rounds, one run of each per round, so that a
    disturbance of the machine falls on all of them alike; one median each, in order."""
    from dlcv_fast import bench

    calls = []
    fns = [lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(2e-3))]
    medians = bench.median_ms_many(fns, torch.device("cpu"), budget_s=0.01)
    timed = calls[6:]  # after three warm-up runs of each
    assert calls[:6] == ["a"] * 3 + ["b"] * 3
    assert len(timed) >= 10 and timed == ["a", "b"] * (len(timed) // 2)
    assert len(medians) == 2 and medians[1] >= 2.0 > medians[0]


def test_timed_backend_is_set_per_call_and_restored():
    """in_backend's functions run on their backend (set by assignment, without a context
    manager's cost in the timing), and median_ms_many leaves the backend it found."""
    import dlcv_fast
    from dlcv_fast import bench

    seen = []
    fns = [lambda: seen.append(dlcv_fast.get_backend()),
           bench.in_backend("cpu", lambda: seen.append(dlcv_fast.get_backend()))]
    with dlcv_fast.use_backend("auto"):
        bench.median_ms_many(fns, torch.device("cpu"), budget_s=0.01)
        assert dlcv_fast.get_backend() == "auto"
    assert seen[:3] == ["auto"] * 3 and seen[3:6] == ["cpu"] * 3
