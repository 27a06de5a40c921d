"""benchmarks/dp_step.py, conv_impl.py, xla_options.py, heap_growth.py and gpu_check.{sh,py}:
they run, and report what they claim.

No timing is asserted anywhere (the machine is shared); only structure and invariants.
The GPU check's smoke mode runs in a subprocess through gpu_check.sh, exactly as on the GPU
machine, with JAX on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdpdm

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dp_step():
    return _load("dp_step")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, **extra)
    return env


@pytest.mark.slow
def test_gpu_check_smoke_passes_invariants_and_reports(tmp_path):
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--smoke"], cwd=tmp_path,
                          env=_env(OUT=str(tmp_path)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result  # the final JSON line

    assert result["mode"] == "smoke" and result["environment"]["backend"] == "cpu"
    checks = {c["name"]: c for c in result["invariants"]}
    assert {
        "sigma0_Cinf_equals_mean_grad", "clipped_norm_le_C", "unclipped_passed_through",
        "padding_contributes_zero", "nonfinite_example_zeroed", "noise_std", "noise_reproducible",
        "noise_fresh_each_step", "no_tensorflow_imported"
    } <= set(checks)
    assert all(c["passed"] for c in checks.values()), checks
    assert result["invariants_passed"] and not result["errors"] and not result["skipped"]

    assert [s["nonprivate"]["chunks"] for s in result["steps"]] == [1, 2]
    for step in result["steps"]:
        for row in [step["nonprivate"]] + step["dp"]:
            assert row["median_s"] > 0 and len(row["times"]) >= 1
            assert row["batch"] == row["chunks"] * 4
        for row in step["dp"]:
            assert math.isclose(row["ratio"], row["median_s"] / step["nonprivate"]["median_s"])
    # The second (2-chunk) item reuses the first item's compiled programs.
    assert result["steps"][1]["dp"][0]["compile_s"] == 0.0
    (sample,) = result["sampling"]
    assert sample["dtype"] == "bfloat16" and sample["finite"] and sample["images_per_s"] > 0
    accounting = result["accounting"]
    assert accounting["pld_le_rdp"] and 0 < accounting["epsilon_pld"] < math.inf


def test_gpu_check_runs_without_dp_accounting():
    """On a machine without dp_accounting the check still imports jaxdpdm.dp and skips only
    its accounting section (imports only: nothing is compiled)."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["dp_accounting"] = None  # `import dp_accounting` now fails
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import gpu_check
        import jaxdpdm.parallel, jaxdpdm.sampling
        assert not gpu_check.ACCOUNTING_AVAILABLE
        assert "skipped" in gpu_check.check_accounting(gpu_check.SMOKE)
        try:
            jaxdpdm.dp.accounting.epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=1,
                                          delta=1e-5)
        except ImportError:
            pass
        else:
            raise AssertionError("accounting must not work without dp_accounting")
        assert "tensorflow" not in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_nonprivate_accumulate_is_the_summed_gradient_at_any_microbatch(dp_step):
    """The baseline's program of one microbatch, called per microbatch and added (as the
    benchmark's host loop does), returns the gradient of the summed per-example loss."""

    def loss_fn(params, example, rng):
        noise = jax.random.normal(rng, ())
        return jnp.sum((params["w"] * example["image"] - noise)**2) * (1 + example["label"])

    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 3)).astype(np.float32),
        "label": np.arange(8, dtype=np.int32) % 3, "index": np.arange(8, dtype=np.int32)
    }
    params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    key = jax.random.key(1)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch["index"])
    expected = jax.grad(lambda p: jnp.sum(jax.vmap(loss_fn, (None, 0, 0))(p, batch, keys)))(params)
    accumulate = dp_step.make_nonprivate_accumulate(loss_fn)
    for micro in (2, 8):
        parts = [
            accumulate(params, {k: v[i:i + micro]
                                for k, v in batch.items()}, key)
            for i in range(0, 8, micro)
        ]
        got = sum(np.asarray(part["w"]) for part in parts)
        np.testing.assert_allclose(got, expected["w"], rtol=1e-5)
        assert parts[0]["w"].dtype == jnp.float32


def test_dp_step_arguments_are_checked(dp_step):
    args = dp_step.parse_args(["--preset=tiny", "--batch=16", "--microbatch=4,8"])
    assert args.microbatch == [4, 8] and args.nonprivate_microbatch == 8
    for bad in (["--batch=10", "--microbatch=4"], ["--microbatch=0"], ["--microbatch=a"],
                ["--dtype=float16"], ["--preset=huge"], ["--repeats=0"]):
        with pytest.raises(SystemExit):
            dp_step.parse_args(bad)
    with pytest.raises(ValueError, match="dtype"):
        dp_step.model_config("tiny", None, "float16")
    assert dp_step.model_config("cpu_small", 16, "bfloat16").image_size == 16


def test_dp_step_main_prints_a_table_and_one_json_line(dp_step, monkeypatch, capsys, tmp_path):
    """The command line around `compare` (measuring itself runs in the smoke test above)."""
    row = {
        "kind": "nonprivate", "dtype": "float32", "batch": 16, "chunks": 1, "microbatch": 8,
        "augmult": 2, "compile_s": 1.0, "warmup_s": 0.5, "median_s": 0.2, "times": [0.2],
        "xla_mib": 3.0, "peak_mib": None, "ms_per_example": 12.5
    }
    canned = {
        "nonprivate": row, "dp": [{
            **row, "kind": "dp", "median_s": 0.6, "ratio": 3.0, "ms_per_example": 37.5,
            "extra_ms_per_example": 25.0
        }]
    }

    class FakeBench:

        def __init__(self, config, *, augmult, chunk_rows):
            self.num_params = 123

    monkeypatch.setattr(dp_step, "Bench", FakeBench)
    monkeypatch.setattr(dp_step, "compare", lambda bench, micro, **kw: canned)
    out_file = tmp_path / "r.json"
    result = dp_step.main(
        ["--preset=tiny", "--batch=16", "--microbatch=8", "--augmult=2", f"--json-out={out_file}"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("dp ") and "3.00" in line for line in lines)
    assert json.loads(lines[-1]) == json.loads(out_file.read_text()) == json.loads(
        json.dumps(result, sort_keys=True))
    assert result["num_params"] == 123 and result["environment"]["jax"] == jax.__version__


def test_conv_impl_times_both_implementations_of_a_configs_step(monkeypatch, capsys, tmp_path):
    """The command line around `dp_step.Bench` (which the smoke test above runs for real): the
    config's model, K and microbatch, one Bench per implementation, steps interleaved, one JSON
    line, also written to --json-out."""
    conv_impl = _load("conv_impl")
    built, calls = [], []

    class FakeBench:

        def __init__(self, config, *, augmult, chunk_rows):
            built.append((config.conv_impl, config.image_size, augmult, chunk_rows))
            self.num_params, self.impl = 123, config.conv_impl

        def stepper(self, kind, microbatch):
            assert microbatch == 8
            return (lambda: calls.append(f"{kind}/{self.impl}")), 1.5

    monkeypatch.setattr(conv_impl.dp_step, "Bench", FakeBench)
    config = f"{REPO_ROOT / 'configs' / 'quickstart.py'}:tiny"
    out_file = tmp_path / "r.json"
    result = conv_impl.main([f"--config={config}", "--repeats=3", "--nonprivate",
                             f"--json-out={out_file}"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(out_file.read_text())
    # The :tiny variant's 8x8 images, K = 2, microbatch 8; a step is two microbatches.
    assert built == [("xla", 8, 2, 16), ("patch_matmul", 8, 2, 16)]
    names = ["dp/xla", "nonprivate/xla", "dp/patch_matmul", "nonprivate/patch_matmul"]
    assert calls == names + names * 3  # one warm-up each, then interleaved repeats
    assert set(result["medians_s"]) == set(names)
    assert all(len(t) == 3 for t in result["times_s"].values())
    for kind, ratio in result["ratio_xla_over_patch_matmul"].items():
        assert ratio == pytest.approx(result["medians_s"][f"{kind}/xla"] /
                                      result["medians_s"][f"{kind}/patch_matmul"])
        assert any(line.strip().startswith(f"{kind}: xla / patch_matmul") for line in lines)
    for bad in (["--batch=12"], ["--repeats=0"]):  # 12 rows are not whole microbatches of 8
        with pytest.raises(SystemExit):
            conv_impl.parse_args([f"--config={config}", *bad])


def _vs_pytorch():
    pytest.importorskip("torch")
    return _load("vs_pytorch")


def test_vs_pytorch_port_computes_the_same_unet():
    """Same parameter count for every preset, and the same function: jaxdpdm's tiny UNet with
    random (nowhere zero) weights, copied into the port, gives the same noise prediction."""
    torch = pytest.importorskip("torch")
    vs = _vs_pytorch()
    from jaxdpdm.models import unet
    for preset in unet.PRESET_NAMES:
        config = unet.unet_preset(preset)
        assert vs.torch_parameter_count(config) == unet.count_parameters(config), preset
    config = unet.unet_preset("tiny")
    rng = np.random.default_rng(0)
    # Host-side numpy draws: one jax.random call per parameter shape would compile once each.
    params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                          unet.param_shapes(config))
    x = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
    t, y = np.array([0, 500, 999], np.int32), np.array([0, 7, 10], np.int32)
    expected = jax.jit(unet.make_apply_fn(config, train=False))(params, x, t, y, None)
    model = vs.TorchUNet(config).eval()
    vs.load_flax_params(model, params)
    with torch.no_grad():
        got = model(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            torch.from_numpy(t).long(),
            torch.from_numpy(y).long()).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-4, atol=1e-4)


def test_vs_pytorch_without_torch_says_so_and_returns(monkeypatch, capsys):
    vs = _vs_pytorch()
    monkeypatch.setattr(vs, "torch", None)
    assert vs.main(["--preset=tiny", "--image-size=8", "--batch=4"]) is None
    assert "torch is not installed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        vs.parse_args(["--batch=6", "--jax-microbatch=4"])


def test_vs_pytorch_torch_steps_run_and_train():
    """Each PyTorch step (non-private, torch.func DP, Opacus DP) runs and changes the weights."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # a tiny model; several threads only spin on a shared machine
    vs = _vs_pytorch()
    from jaxdpdm.models import unet
    steps = vs.torch_steps(unet.unet_preset("tiny"), batch=3, augmult=2)
    assert set(steps) == {"torch_nonprivate", "torch_func_dp"
                         } | ({"opacus_dp"} if vs.opacus is not None else set())
    for name, (model, step) in steps.items():
        before = [p.detach().clone() for p in model.parameters()]
        step()
        changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
        # The DP steps' noise moves every parameter; without noise, the zero-initialised last
        # convs leave some gradients exactly zero at the first step.
        assert all(changed) if name.endswith("_dp") else any(changed), name


def test_xla_options_compiles_each_candidate_and_reports_speedups(capsys, tmp_path):
    """Real programs of the quickstart's :tiny variant (the two cheapest to compile): one compiled
    program per candidate, each timed; the option reaches the compiler (the programs differ) and
    changes no value."""
    import jaxlib
    if not jaxlib.__version__.startswith(jaxdpdm.TESTED_JAXLIB_PREFIXES):
        pytest.skip("the YNNPACK option is known only to the jaxlib releases jaxdpdm measured")
    xo = _load("xla_options")
    assert xo.compiler_option(" dot, reduce") == {
        xo.OPTION: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    }
    assert xo.compiler_option("env") == {}
    for bad in ("", "dot,conv"):
        with pytest.raises(ValueError):
            xo.compiler_option(bad)
    config = f"{REPO_ROOT / 'configs' / 'quickstart.py'}:tiny"
    for bad in (["--candidates=dot;eltwise,matmul"], ["--programs=sample,fid"], ["--repeats=0"]):
        with pytest.raises(SystemExit):
            xo.parse_args([f"--config={config}", *bad])

    args = xo.parse_args([f"--config={config}", "--programs=sample,classifier",
                          "--candidates=dot,eltwise,reduce;dot,reduce"])
    lowered, call_args = xo.lowered_programs(args)["sample"]
    compiled = [lowered.compile(compiler_options=xo.compiler_option(c)) for c in args.candidates]
    texts = [c.as_text() for c in compiled]
    assert texts[0].count("__ynn_fusion") > texts[1].count("__ynn_fusion")  # eltwise left to XLA
    np.testing.assert_allclose(compiled[0](*call_args), compiled[1](*call_args), atol=1e-5)

    out_file = tmp_path / "r.json"
    result = xo.main([f"--config={config}", "--programs=sample,classifier", "--repeats=2",
                      "--candidates=dot,eltwise,reduce;dot,reduce", f"--json-out={out_file}"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(out_file.read_text())
    names = {f"{p}/{c}" for p in ("sample", "classifier") for c in ("dot,eltwise,reduce",
                                                                      "dot,reduce")}
    assert set(result["times_s"]) == names and all(len(t) == 2 for t in result["times_s"].values())
    for name, speedup in result["speedup_over_first"].items():
        first = name.split("/")[0] + "/dot,eltwise,reduce"
        assert speedup == pytest.approx(result["medians_s"][first] / result["medians_s"][name])
    assert result["speedup_over_first"]["sample/dot,eltwise,reduce"] == 1.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs glibc Linux and /proc")
def test_heap_growth_reports_each_setting_and_glibc_faults_every_call(capsys):
    heap_growth = _load("heap_growth")
    assert heap_growth.main(["--mib=64", "--calls=3", "--settings=jaxdpdm,glibc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    report = json.loads(lines[-1])
    assert [line.split()[0] for line in lines[:-1]] == ["jaxdpdm", "glibc"]
    for record in report["results"].values():
        assert record["temp_bytes"] >= 64 * 2**20  # the [n, n] product is the temporary
        assert len(record["rss_gb"]) == 1 + 3 and record["peak_gb"] >= max(record["rss_gb"]) * 0.99
    # glibc maps a block over 32 MiB afresh on every call: each call faults all of its pages in,
    # the cost jaxdpdm's settings exist to avoid.
    assert report["results"]["glibc"]["faults_per_call"] >= 0.9 * 64 * 2**20 / 4096
