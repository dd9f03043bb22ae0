"""`vtadl-jax selftest`: passes on this backend, and a broken kernel makes it exit 1."""
import importlib
import json

from vtadl_jax import cli, selftest


def test_quick_selftest_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "selftest.json"
    assert cli.main(["selftest", "--quick", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["passed"] and result["backend"] == "cpu" and result["num_devices"] == 8
    kernels = {c["kernel"].split("[")[0] for c in result["checks"]}
    for name in ("ssim", "gaussian_blur", "resize_bilinear", "resize_nearest", "mixture_nll",
                 "mixture_nll_from_head", "mixture_nll_full_cov", "vtadl_code_mdn_loss",
                 "gaussian.finalize", "cholesky_factor", "mahalanobis", "squash", "auroc",
                 "average_precision", "aupro", "shard_map gaussian update",
                 "shard_map mixture_nll grad"):
        assert name in kernels, name
    assert {c["dtype"] for c in result["checks"]} >= {"float32", "bfloat16"}
    assert "FAIL" not in out and f"{len(result['checks'])}/{len(result['checks'])} passed" in out


def test_broken_kernel_fails(monkeypatch, capsys):
    ssim_module = importlib.import_module("vtadl_jax.kernels.ssim")
    real = ssim_module.ssim
    # Off by 1e-3: far inside what a loss curve would show, far outside the tolerance.
    monkeypatch.setattr(ssim_module, "ssim", lambda x, y, **kw: real(x, y, **kw) + 1e-3)
    monkeypatch.setattr(selftest, "CHECKS", (selftest.check_images, selftest.check_metrics))
    assert cli.main(["selftest", "--quick"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("ssim[same]") and ln.rstrip().endswith("FAIL") for ln in lines)
    assert any(ln.startswith("gaussian_blur") and ln.rstrip().endswith("ok") for ln in lines)


def test_crashing_kernel_is_a_failed_check(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("backend lost")

    monkeypatch.setattr(importlib.import_module("vtadl_jax.metrics"), "auroc", broken)
    monkeypatch.setattr(selftest, "CHECKS", (selftest.check_metrics,))
    assert cli.main(["selftest", "--quick"]) == 1
    assert "RuntimeError: backend lost" in capsys.readouterr().out


def test_broken_gradient_form_fails(monkeypatch, capsys):
    """A kernel gradient 1% off in one gradient form fails only that form's checks."""
    ct = importlib.import_module("vtadl_jax.kernels.conv_transpose")
    real = ct.kernel_grad_gemm
    monkeypatch.setattr(ct, "kernel_grad_gemm", lambda *a, **k: real(*a, **k) * 1.01)
    monkeypatch.setattr(selftest, "CHECKS", (selftest.check_convolutions,))
    assert cli.main(["selftest", "--quick"]) == 1
    lines = [ln.rstrip() for ln in capsys.readouterr().out.splitlines()]
    gemm_dw = [ln for ln in lines if ", gemm] dw" in ln and "float32" in ln]
    assert gemm_dw and all(ln.endswith("FAIL") for ln in gemm_dw)
    others = [ln for ln in lines if ln.startswith("conv_transpose[") and ", gemm] dw" not in ln]
    assert others and all(ln.endswith("ok") for ln in others)
