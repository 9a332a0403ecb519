"""`python -m dlcv_fast demo` (make demo): the kernel tables first, then LeNet-5."""

import dlcv_fast.__main__ as cli


def test_demo_runs_check_then_bench_then_lenet(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_check", lambda args: calls.append("check") or 0)
    monkeypatch.setattr(cli, "_bench", lambda args: calls.append("bench") or 0)
    monkeypatch.setattr(cli, "_lenet", lambda args: calls.append(("lenet", args.quick)) or 0)
    assert cli.main(["demo"]) == 0
    assert calls == ["check", "bench", ("lenet", False)]


def test_demo_fails_when_lenet_fails(monkeypatch):
    monkeypatch.setattr(cli, "_check", lambda args: 0)
    monkeypatch.setattr(cli, "_bench", lambda args: 0)
    monkeypatch.setattr(cli, "_lenet", lambda args: 1)
    assert cli.main(["demo"]) == 1
