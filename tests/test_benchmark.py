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


SHARDED_CHILD = r'''
import json, sys
import jax, numpy as np
from jax.sharding import Mesh
from jax_mamba import _bench_cases as bc, benchmark
assert len(jax.devices()) == 2, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("m",))
c = bc.Config(batch=6, heads=4, ngroups=2, dim=8, dstate=16, z=True)
arr = benchmark.Arrays(c, 3, 0.05, jax.devices()[0], mesh=mesh, shard="slots")
slots = np.stack([np.asarray(s) for s in arr.slots(3)])
shard_of = slots // (arr.S // 2)
heads = benchmark.Arrays(c, 1, 0.05, jax.devices()[0], mesh=mesh, shard="heads")
print("checks: " + json.dumps({
    "S": arr.S, "slots_local": bool((shard_of == np.arange(6) % 2).all()),
    "distinct": len(set(slots.ravel())) == slots.size,
    "state_slots": list(arr.carry[0].sharding.spec),
    "state_heads": list(heads.carry[0].sharding.spec),
    "x_heads": list(heads.inputs[0][0].sharding.spec),
    "B_heads": list(heads.inputs[0][2].sharding.spec)}))
benchmark.main(sys.argv[1:])
'''


def test_sharded_rows_on_two_cpu_devices(tmp_path):
    """--shard heads / slots on 2 forced host devices (a child process: the device count is
    fixed when jax initialises): each shard's entries get its own slots, the arrays are laid
    out as the module docstring says, and every layout gives a row whose state came back
    sharded and in place."""
    import os
    import subprocess
    import sys
    path = tmp_path / "r.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = ["--platform", "cpu", "--batch", "8", "--heads", "4", "--ngroups", "2", "--dim", "8",
            "--dstate", "16", "--mtp", "2", "--calls", "2", "--reps", "2", "--cache-mb", "0.5",
            "--copy-mb", "1", "--flush-mb", "0.5", "--shard", "heads", "--shard", "slots",
            "--devices", "2", "--json", str(path)]
    r = subprocess.run([sys.executable, "-c", SHARDED_CHILD] + args, capture_output=True,
                       text=True, timeout=300, env=env, cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stdout + r.stderr
    line = [l for l in r.stdout.splitlines() if l.startswith("checks: ")][0]
    checks = json.loads(line[len("checks: "):])
    assert checks["slots_local"] and checks["distinct"] and checks["S"] % 2 == 0, checks
    assert checks["state_slots"] == ["m"] and checks["state_heads"] == [None, "m"], checks
    assert checks["x_heads"] == [None, "m"] and checks["B_heads"] == [None, "m"], checks
    d = json.loads(path.read_text())
    assert d["header"]["devices"] == 2 and d["header"]["shard"] == ["heads", "slots"]
    assert [(row["shard"], row["devices"], row["impl"]) for row in d["rows"]] == [
        (None, 1, "ffi"), ("heads", 2, "ffi"), ("slots", 2, "ffi")]
    nbytes = {row["bytes_per_call"] for row in d["rows"]}
    assert len(nbytes) == 1, nbytes  # one count for every layout: the whole call's bytes
    for row in d["rows"]:
        assert row["state_kept"], row
        assert row["us_per_call"] is None or row["gbs"] > 0
    assert "vs 1" in r.stdout and "heads x2" in r.stdout and "slots x2" in r.stdout


@pytest.mark.parametrize("argv,msg", [
    (["--devices", "2"], "--devices"), (["--shard", "heads", "--devices", "0"], "--devices"),
    (["--shard", "slots", "--impl", "reference"], "ffi")])
def test_bad_shard_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_shard_defaults():
    o = benchmark.parse_args([])
    assert o.impl == ["ffi", "reference"] and o.shard == []
    o = benchmark.parse_args(["--shard", "heads", "--shard", "slots", "--shard", "heads"])
    assert o.impl == ["ffi"] and o.shard == ["heads", "slots"]


def test_shard_problem():
    """What a layout cannot run without gathering something state-sized is skipped (a row
    'skipped over ...'), not timed."""
    c = bc.CASES["b64-bf16"]  # H64 G8
    assert benchmark.shard_problem(c, "heads", 2) is None
    assert benchmark.shard_problem(c, "heads", 16) is None          # 16 = 2 x G: one group each
    assert "groups" in benchmark.shard_problem(dataclasses.replace(c, heads=12, ngroups=3),
                                               "heads", 4)
    assert "heads" in benchmark.shard_problem(dataclasses.replace(c, heads=6, ngroups=1),
                                              "heads", 4)
    assert benchmark.shard_problem(c, "slots", 2) is None
    assert "intermediate" in benchmark.shard_problem(bc.CASES["mtp4-b64-bf16-inter"], "slots", 2)
    assert benchmark.shard_problem(bc.CASES["mtp4-b64-bf16-inter"], "heads", 2) is None
    assert "Mamba-1" in benchmark.shard_problem(bc.CASES["mamba1-b64-fp32"], "heads", 2)
