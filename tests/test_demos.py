"""The command line's lenet and diffuse (quick modes) and profile."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from dlcv_fast import models, profile


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dlcv_fast", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def test_lenet_quick_trains_and_writes_the_curves(tmp_path):
    png = tmp_path / "curves.png"
    out = _run("lenet", "--quick", "--out", str(png))
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("test accuracy: "))
    accuracy = float(line.removeprefix("test accuracy: ").removesuffix("%"))
    assert accuracy > 50  # 4 epochs on 500 images (about 79%): far above chance (10%)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "LeNet-5 on digits" in out.stderr  # the progress bar


@pytest.mark.slow
def test_lenet_full_run_reaches_97_percent(tmp_path):
    """The demo as `make demo` runs it (10 epochs, about 7 s): the issue's 97% test accuracy."""
    out = _run("lenet", "--out", str(tmp_path / "curves.png"))
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("test accuracy: "))
    assert float(line.removeprefix("test accuracy: ").removesuffix("%")) >= 97.0, line


def test_digits_data():
    from dlcv_fast.demos import lenet

    x_train, y_train, x_test, y_test = lenet.load_digits_32()
    assert x_train.shape[1:] == x_test.shape[1:] == (1, 32, 32)
    assert len(y_train) + len(y_test) == 1797 and len(y_test) == 360
    assert set(y_test.tolist()) == set(range(10))  # stratified: every class in the test set
    assert abs(x_train.mean().item()) < 1e-5 and abs(x_train.std().item() - 1) < 1e-4


def test_profile_cli_torchvision_model(tmp_path):
    png = tmp_path / "profile.png"
    out = _run("profile", "--model", "resnet18", "--batch", "1", "--image-size", "32",
               "--out", str(png), "--budget", "0.01")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "conv1" in out.stdout and "layer4.1.conv2" in out.stdout
    assert any(line.split()[:2] == ["maxpool", "max_pool2d"] for line in out.stdout.splitlines())
    assert "whole forward pass" in out.stdout and "BatchNorm2d" in out.stdout
    assert "TFLOP/s" in out.stdout and "GB/s" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "profiling layers" in out.stderr


def test_profile_rows_of_a_dlcv_fast_model():
    model = models.lenet5()
    x = torch.randn(2, 1, 32, 32)
    rows, ms, torch_ms = profile.profile(model, x, progress=False, budget_s=0.01)
    assert [(r.layer, r.op) for r in rows] == [
        ("features.0", "conv2d"), ("features.2", "max_pool2d"),
        ("features.3", "conv2d"), ("features.5", "max_pool2d")]
    assert rows[0].shape == (2, 1, 32, 32)
    assert rows[0].flops == 2 * 2 * 6 * 28 * 28 * 25
    assert all(r.ms > 0 and r.torch_ms > 0 for r in rows) and ms > 0 and torch_ms > 0
    assert type(model.features[0]).__module__ == "dlcv_fast.nn.conv"  # converted back
    table = profile.format_table(rows, ms, torch_ms)
    assert "total of these layers" in table


def test_profile_a_model_with_timesteps():
    model, channels, size, _ = profile.build_model("diffusion_unet", image_size=8)
    assert (channels, size) == (1, 8)
    x = torch.randn(2, channels, size, size)
    extra = profile.extra_inputs(model, 2, x.device)
    assert len(extra) == 1 and extra[0].shape == (2,) and extra[0].dtype == torch.int64
    rows, ms, torch_ms = profile.profile(model, x, progress=False, budget_s=0.005, extra=extra)
    ops = {r.op for r in rows}
    assert {"conv2d", "attention"} <= ops, ops
    assert rows[0].shape == (2, 1, 8, 8) and ms > 0 and torch_ms > 0
    assert profile.extra_inputs(models.lenet5(), 2, x.device) == ()


def test_diffuse_quick_trains_samples_and_writes_the_grid(tmp_path):
    png = tmp_path / "samples.png"
    # One thread: on cores that other jobs share, two threads stall on each other in the
    # thousands of small parallel loops of a UNet step (10 s becomes minutes).
    out = _run("diffuse", "--quick", "--out", str(png), "--seed", "3",
               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    losses = re.search(r"^trained 8 steps in .* s \(loss ([\d.]+) over the first 4 steps, "
                       r"([\d.]+) over the last 4\)$", out.stdout, re.M)
    assert losses, out.stdout
    first, last = float(losses[1]), float(losses[2])
    assert 0 < first < 2 and 0 < last < 2  # finite mean-squared errors of unit-variance noise
    line = next(x for x in out.stdout.splitlines() if x.startswith("recognised as digits: "))
    assert line.endswith("of held-out real digits)")
    assert "sampled 16 images with 5 DDIM steps" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DDPM on digits" in out.stderr  # the progress bar


def test_diffuse_judge_recognises_real_digits_and_not_noise():
    from dlcv_fast.demos import diffuse

    x_train, y_train, x_test, y_test = diffuse.load_digits_16()
    assert x_train.shape[1:] == (1, 16, 16) and len(y_train) + len(y_test) == 1797
    assert x_train.min() >= -1 and x_train.max() <= 1 and x_train.min() == -1
    judge = diffuse.DigitJudge(x_train, y_train, x_test[0::2])
    labels, recognised = judge.judge(x_test[1::2])
    assert recognised.float().mean() > 0.75  # real digits pass (about 86%)
    assert (labels[recognised] == y_test[1::2][recognised]).float().mean() > 0.95
    noise = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert not judge.judge(noise)[1].any()  # noise does not, though the classifier is sure
    blank = -torch.ones(4, 1, 16, 16)
    assert not judge.judge(blank)[1].any()


def test_profile_usage_errors_are_messages():
    """A bad model name, size or count is a one-line usage error (exit 2), no traceback."""
    for args, message in ((("--model", "nosuch"), "model must be one of"),
                          (("--model", "lenet5", "--batch", "0"), "must be positive, got 0"),
                          (("--model", "lenet5", "--image-size", "64"),
                           "lenet5 takes 32x32 images"),
                          (("--model", "lenet5", "--budget", "-1"), "must be positive"),
                          (("--model", "vit_tiny", "--image-size", "30"),
                           "vit_tiny cannot be built for --image-size 30: VisionTransformer"),
                          (("--model", "alexnet", "--image-size", "16"),
                           "alexnet cannot take 3x16x16 images: max_pool2d"),
                          (("--model", "densenet121", "--image-size", "16"),  # torch's pool
                           "densenet121 cannot take 3x16x16 images")):
        out = _run("profile", *args)
        assert out.returncode == 2, (args, out.stdout + out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_diffuse_and_out_usage_errors_come_before_the_work(tmp_path):
    """Seeds outside [0, 2^32), more sampling steps than training timesteps and an --out
    that cannot be written are usage errors (exit 2) before any training or timing."""
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    cases = [(("diffuse", "--seed", "-1"), "must lie in [0, 2^32), got -1"),
             (("diffuse", "--seed", str(2**32)), "must lie in [0, 2^32)"),
             (("diffuse", "--steps", "1001"), "--steps must be at most the 1000 training"),
             (("diffuse", "--out", str(blocked / "x.png")), "cannot write --out"),
             (("lenet", "--out", str(blocked / "x.png")), "cannot write --out"),
             (("profile", "--model", "lenet5", "--out", str(blocked / "x.png")),
              "cannot write --out")]
    for args, message in cases:
        out = _run(*args)
        assert out.returncode == 2, (args, out.stdout + out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert out.stdout == "", out.stdout  # nothing ran


def test_profile_torchvision_backbones_are_random_too(monkeypatch):
    """Segmentation and detection models default to a pretrained backbone: profile asks for
    none, so nothing is downloaded."""
    import torch.hub

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"profile downloaded {url}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model, channels, size, summary = profile.build_model("lraspp_mobilenet_v3_large", 64)
    assert (channels, size) == (3, 64) and "Conv2d" in summary


def test_profile_table_columns_fit_long_names():
    row = profile.LayerRow("encoder.layers.encoder_layer_0.self_attention", "attention",
                           (2, 50, 768), 1.0, 2.0, 1e9, 1e6)
    short = profile.LayerRow("conv1", "BatchNorm2d+relu", (2, 3, 8, 8), 1.0, 1.0, 0.0, 1e6)
    lines = profile.format_table([row, short], 2.0, 3.0).splitlines()
    # every row's numbers start in the header's column
    col = lines[0].index("dlcv_fast ms")
    for line in (lines[2], lines[3], lines[-1]):
        assert line[col:col + 12].strip().replace(".", "").isdigit(), line
