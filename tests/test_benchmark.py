"""The benchmark CLI on the CPU: copy target, argument checks, named cases, JSON, ncu parsing.
Quick by design (tiny shapes, few reps); nothing here asserts a speed."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from jax_mamba import _bench_cases as bc
from jax_mamba import _bench_ncu, benchmark

CPU = jax.devices("cpu")[0]


@pytest.mark.parametrize("dtype,shape", [
    (np.float32, (3, 5)), (jnp.bfloat16, (7,)), (np.float16, (2, 1, 3)), (np.int8, (4, 4)),
    (np.uint32, ()), (np.bool_, (9,)), (np.float32, (0, 3)), (np.complex64, (2, 2))])
def test_copy_is_bit_exact_inside_jit(dtype, shape):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    # random bytes (NaN payloads, subnormals included) except for bool, which must be 0/1
    host = (raw[:int(np.prod(shape))] % 2).astype(bool).reshape(shape) if dtype == np.bool_ \
        else raw.view(np.dtype(dtype)).reshape(shape)
    x = jax.device_put(host, CPU)
    y = jax.jit(lambda a: benchmark.device_copy(benchmark.device_copy(a)))(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.asarray(y).tobytes() == host.tobytes()


def test_copy_under_vmap():
    x = jax.device_put(np.arange(12, dtype=np.float32).reshape(3, 4), CPU)
    np.testing.assert_array_equal(jax.vmap(benchmark.device_copy)(x), x)


@pytest.mark.parametrize("argv,msg", [
    (["--inter"], "--inter"), (["--inter", "--mtp", "0"], "--inter"),
    (["--sr", "--state-dtype", "float32"], "--sr"), (["--sr", "--state-dtype", "int16"], "--sr"),
    (["--mtp", "-1"], "--mtp"), (["--calls", "0"], "--calls"), (["--cache-mb", "0"], "--cache-mb"),
    (["--heads", "6", "--ngroups", "4"], "--ngroups"), (["--mamba1", "--heads", "4"], "--mamba1"),
    (["--case", "b64-bf16", "--heads", "32"], "--case"), (["--case", "nope"], "nope")])
def test_bad_combinations_are_rejected(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(benchmark.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--plot", "x.png"])
    assert "matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(bc.CASES))
def test_named_case_resolves_to_valid_arguments(name):
    c = bc.CASES[name]
    assert benchmark.parse_args(["--case", name]).configs == [c]
    assert c.label == name and bc.validate(c) is None and bc.bytes_per_call(c) > 0


def test_case_all_skips_the_large_cache_row():
    names = [c.name for c in benchmark.parse_args(["--case", "all", "--case", "b1-bf16"]).configs]
    assert "b256-bf16-cache32g" not in names and len(names) == len(set(names)) == len(bc.CASES) - 1


def _small(c):
    """The case's dtypes and options at a tiny shape (dstate kept: its variants are the point)."""
    return dataclasses.replace(c, batch=2, heads=1 if c.mamba1 else c.ngroups, dim=8,
                               cache_mb=None)


def test_every_case_runs_one_call_on_cpu():
    for c in bc.CASES.values():
        c = _small(c)
        arr = benchmark.Arrays(c, 1, 0.05, CPU)
        fn = benchmark.make_fn(jax_mamba.selective_state_update, c, 1, "auto")
        (state, *_), outs = fn(arr.carry, arr.params, arr.inputs, arr.slots(1))
        assert all(bool(jnp.isfinite(o.astype(jnp.float32)).all()) for o in outs), c
        assert state.shape[0] == arr.S


def test_main_writes_json(tmp_path):
    path = tmp_path / "r.json"
    # big enough per call (~MBs of state) that t(2K) - t(K) beats dispatch noise on the CPU
    rc = benchmark.main(["--platform", "cpu", "--batch", "32", "--heads", "16", "--ngroups", "4",
                         "--dim", "32", "--dstate", "64", "--calls", "4", "--reps", "3",
                         "--cache-mb", "16", "--copy-mb", "8", "--flush-mb", "1",
                         "--json", str(path)])
    assert rc == 0
    d = json.loads(path.read_text())
    h = d["header"]
    assert h["platform"] == "cpu" and h["copy_gbs"] > 0 and h["jax_version"] == jax.__version__
    assert {"device_kind", "git_commit", "date"} <= set(h)
    assert [r["impl"] for r in d["rows"]] == ["ffi", "reference"]
    for r in d["rows"]:
        assert {"case", "impl", "algorithm", "us_per_call", "gbs", "pct_copy", "speedup"} <= set(r)
        assert r["case"] == "b32-H16-P32-N64-G4-bf16" and r["bytes_per_call"] > 0
        assert all(v > 0 for v in r["chain_median_us"].values()) and len(r["chain_median_us"]) == 2
        # None only when noise made t(2K) <= t(K) (a loaded machine); never zero or negative
        assert r["us_per_call"] is None or (r["us_per_call"] > 0 and r["gbs"] > 0)
    assert d["rows"][1]["speedup"] is None
    assert d["rows"][0]["speedup"] is None or d["rows"][0]["speedup"] > 0


NCU_CSV = '''==PROF== Connected to process 123
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python","h","ssu_simple<...>","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","1,012.50"
"1","123","python","h","ssu_simple<...>","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","2000"
'''


def test_ncu_csv_parsing():
    assert _bench_ncu.parse_csv(NCU_CSV) == pytest.approx([1012.5, 2.0])
    assert _bench_ncu.parse_csv("==ERROR== no kernels were profiled") == []


def test_profile_without_ncu_is_a_message(monkeypatch):
    monkeypatch.setattr(_bench_ncu, "find_ncu", lambda: None)
    us, msg = _bench_ncu.kernel_us_per_call({"calls": 1, "runs": 1})
    assert us is None and "ncu" in msg


def test_profile_plumbing_with_a_fake_ncu(tmp_path, monkeypatch):
    """The ncu command line, the --profile-child run (here on the CPU) and the CSV read back;
    a stand-in ncu runs the command and writes two 1000 ns kernels."""
    fake = tmp_path / "ncu"
    row = '"{i}","1","python","h","ssu_simple","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","s",' \
          '"gpu__time_duration.sum","nsecond","1000"'
    header = NCU_CSV.splitlines()[1]
    fake.write_text("#!/bin/sh\nwhile [ \"$1\" != --log-file ]; do shift; done\nlog=$2; shift 2\n"
                    "\"$@\" || exit $?\n"
                    f"cat > \"$log\" <<'X'\n{header}\n{row.format(i=0)}\n{row.format(i=1)}\nX\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NCU", str(fake))
    c = _small(bc.CASES["b64-int16"])
    spec = {"config": dataclasses.asdict(c), "calls": 2, "runs": 1, "cache_mb": 0.05,
            "algorithm": "auto", "platform": "cpu"}
    us, msg = _bench_ncu.kernel_us_per_call(spec, timeout=120)
    assert us == pytest.approx(1.0), msg


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"family": "bf16", "impl": "ffi", "batch": b, "gbs": g} for b, g in ((1, 5), (8, 9))]
    benchmark.plot(rows, tmp_path / "p.png", {"copy_gbs": 10, "device_kind": "cpu"})
    assert (tmp_path / "p.png").stat().st_size > 0
