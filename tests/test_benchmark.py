"""The benchmark CLI on the CPU: copy target, argument checks, --help texts, named cases, JSON,
the ruler check (a row above 100% of copy is an error), ncu parsing; on a GPU, the ceiling
(cudaMemcpyAsync and the SM copy kernel). Quick by design (tiny shapes, few reps); nothing here
asserts a speed."""
import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mamba
from jax_mamba import _bench_cases as bc
from jax_mamba import _bench_ncu, _bench_trace, _copy, benchmark
from conftest import PLATFORMS

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
    d = json.loads(path.read_text())
    h = d["header"]
    # exit status 1 exactly when a row is above 100% of copy (not expected here, but a loaded
    # machine's noise can make a K/2K difference tiny; the flag and the status must agree)
    assert h["ruler_errors"] == benchmark.ruler_errors(d["rows"])
    assert rc == (1 if h["ruler_errors"] else 0), h["ruler_errors"]
    assert h["platform"] == "cpu" and h["copy_gbs"] > 0 and h["jax_version"] == jax.__version__
    # the CPU ceiling: the FFI memcpy chain, no SM kernel
    assert h["copy_method"] == "memcpy_chain" and h["copy_kernel_gbs"] is None
    assert h["copy_memcpy_gbs"] == h["copy_gbs"] and h["copy_bytes"] == 2 * 8 * 2**20
    assert h["copy_buffer_mb"] == h["copy_mb"] == 8 and h["copy_note"] is None
    assert {"device_kind", "git_commit", "date"} <= set(h)
    assert [r["impl"] for r in d["rows"]] == ["ffi", "reference"]
    for r in d["rows"]:
        assert {"case", "impl", "algorithm", "us_per_call", "gbs", "pct_copy", "speedup"} <= set(r)
        assert r["case"] == "b32-H16-P32-N64-G4-bf16" and r["bytes_per_call"] > 0
        assert all(v > 0 for v in r["chain_median_us"].values()) and len(r["chain_median_us"]) == 2
        # None only when noise made t(2K) <= t(K) (a loaded machine); never zero or negative
        assert r["us_per_call"] is None or (r["us_per_call"] > 0 and r["gbs"] > 0)
        assert r["copy_gbs"] == h["copy_gbs"]
        assert r["pct_copy"] is None or r["pct_copy"] == pytest.approx(
            100 * r["gbs"] / h["copy_gbs"])
    assert d["rows"][1]["speedup"] is None
    assert d["rows"][0]["speedup"] is None or d["rows"][0]["speedup"] > 0


def test_git_commit_of_an_exported_tree(monkeypatch):
    """scripts/export_clean.sh's tree has no .git: the header takes JAX_MAMBA_GIT_COMMIT."""
    monkeypatch.setenv("JAX_MAMBA_GIT_COMMIT", "0123abcd")
    assert benchmark.git_commit() == "0123abcd"
    monkeypatch.delenv("JAX_MAMBA_GIT_COMMIT")
    assert benchmark.git_commit() != "0123abcd"


_NCU_COLUMNS = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
                '"Block Size","Grid Size","Device","CC","Section Name","Metric Name",'
                '"Metric Unit","Metric Value"')
_NCU_ROW = ('"{i}","123","python","h","ssu_simple<...>","1","7","(128, 1, 1)","(64, 1, 1)","0",'
            '"9.0","Command line profiler metrics","gpu__time_duration.sum","{unit}","{value}"')
NCU_CSV = "\n".join(["==PROF== Connected to process 123", _NCU_COLUMNS,
                     _NCU_ROW.format(i=0, unit="usecond", value="1,012.50"),
                     _NCU_ROW.format(i=1, unit="nsecond", value="2000"), ""])


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


# --- the ruler: ceiling choice, ratio check, exit status -----------------------------------

def test_ceiling_is_the_faster_method():
    c = _copy.Ceiling.best_of(4000.0, 4200.0, 2 * 2**30, 1024.0)
    assert (c.method, c.gbs, c.memcpy_gbs, c.kernel_gbs) == ("sm_kernel", 4200.0, 4000.0, 4200.0)
    assert c.seconds == pytest.approx(2 * 2**30 / 4200e9)
    c = _copy.Ceiling.best_of(4300.0, 4200.0, 2 * 2**30, 1024.0)
    assert (c.method, c.gbs) == ("memcpy", 4300.0)
    c = _copy.Ceiling.best_of(12.5, None, 2 * 2**20, 1.0, cpu=True)
    assert (c.method, c.gbs, c.kernel_gbs, c.write_gbs) == ("memcpy_chain", 12.5, None, None)
    # the write-only figure is reported, never the ceiling, even when it is the largest
    c = _copy.Ceiling.best_of(4000.0, 4200.0, 2 * 2**30, 1024.0, write_gbs=9000.0)
    assert (c.method, c.gbs, c.write_gbs) == ("sm_kernel", 4200.0, 9000.0)
    assert "write only (cudaMemsetAsync, not a ceiling) 9000 GB/s" in benchmark.describe_ceiling(c)
    assert "write only" not in benchmark.describe_ceiling(
        _copy.Ceiling.best_of(4000.0, 4200.0, 2 * 2**30, 1024.0))


def test_cuda_ceiling_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="device must be a CUDA GPU, got platform 'cpu'"):
        _copy.cuda_ceiling(CPU, 2**30)


def _row(case, pct, **kw):
    return {"case": case, "impl": "ffi", "pct_copy": pct, "copy_gbs": 4000.0, **kw}


def test_ruler_errors_flags_every_row_above_100_percent():
    rows = [_row("ok", 99.9), _row("edge", 100.0), _row("over", 100.1), _row("noisy", None),
            _row("sharded", 150.0, shard="heads", devices=2), _row("way-over", 250.0)]
    errors = benchmark.ruler_errors(rows)
    assert len(errors) == 3, errors
    for e, case in zip(errors, ["over", "sharded", "way-over"]):
        assert e.startswith(f"ERROR: {case} ffi") and "above 100% of copy" in e, e
        assert "the ruler is wrong" in e and "ceiling 4000 GB/s" in e, e
    assert "100.1%" in errors[0] and "(heads x2)" in errors[1] and "250.0%" in errors[2]
    assert benchmark.ruler_errors(rows[:2] + rows[3:4]) == []
    assert benchmark.ruler_errors([_row("x", 90.0)], limit=80) != []
    # the device-time ratio is judged too
    assert benchmark.ruler_errors([_row("dev", 90.0, device_pct_copy=101.0)]) != []
    assert benchmark.ruler_errors([_row("dev", 90.0, device_pct_copy=99.0)]) == []


def test_chain_device_time_is_the_span_of_the_kernels_over_the_calls():
    """_bench_trace.chain_device_us: from the first matching kernel's start to the last one's
    end (gaps included, other kernels before and after left out), over the number of calls."""
    ev = [("flush_copy", 0, 50_000),                          # the L2 flush before the chain
          ("void ssu::cuda::ssu_fast<...>", 100_000, 40_000),  # ns
          ("void ssu::cuda::ssu_fast<...>", 140_100, 40_000),
          ("void ssu::cuda::ssu_fast<...>", 180_200, 39_800)]
    assert _bench_trace.chain_device_us(ev, 3) == pytest.approx((220_000 - 100_000) / 1e3 / 3)
    assert _bench_trace.chain_device_us(ev[:1], 3) is None
    assert _bench_trace.chain_device_us([], 3) is None


def test_traced_run_on_the_cpu_has_no_device_events():
    ran = []
    assert _bench_trace.traced_run(lambda: ran.append(jax.block_until_ready(jnp.ones(3) + 1))) == []
    assert ran


@pytest.mark.parametrize("ceiling_gbs,expect_rc", [(1e-3, 1), (1e6, 0)])
def test_cli_exits_nonzero_above_100_percent_and_still_prints_the_table(
        ceiling_gbs, expect_rc, monkeypatch, tmp_path, capsys):
    """run()'s rows, table, JSON and main's status with a fixed ceiling and a fixed per-call
    time (nothing is timed): a ceiling far below the rows' GB/s makes every row an error."""
    both = _copy.Ceiling.best_of(ceiling_gbs / 2, ceiling_gbs, 2 * 2**30, 1024.0)
    monkeypatch.setattr(benchmark, "measure_ceiling", lambda *a: both)
    monkeypatch.setattr(benchmark, "time_config",
                        lambda impl, c, o, *a, **k: (1e-3, {"K=2": 1e-3, "K=4": 2e-3}, True, None))
    path = tmp_path / "r.json"
    rc = benchmark.main(["--platform", "cpu", "--batch", "2", "4", "--heads", "2", "--ngroups",
                         "1", "--dim", "8", "--dstate", "16", "--json", str(path)])
    out, err = capsys.readouterr()
    assert rc == expect_rc
    d = json.loads(path.read_text())
    h, rows = d["header"], d["rows"]
    assert (h["copy_gbs"], h["copy_method"]) == (ceiling_gbs, "sm_kernel")
    assert (h["copy_memcpy_gbs"], h["copy_kernel_gbs"]) == (ceiling_gbs / 2, ceiling_gbs)
    assert len(rows) == 4  # 2 batches x (ffi, reference): the table is complete either way
    for r in rows:
        assert r["pct_copy"] == pytest.approx(100 * r["bytes_per_call"] / 1e-3 / 1e9 / ceiling_gbs)
        assert f"{r['case']:<28}{r['impl']:<10}" in out
    # both methods named in the device line
    assert "cudaMemcpyAsync" in out and "SM copy kernel" in out
    if expect_rc:
        assert len(h["ruler_errors"]) == 4 and h["ruler_errors"] == err.strip().splitlines()
        assert all("the ruler is wrong" in e for e in h["ruler_errors"])
    else:
        assert h["ruler_errors"] == [] and "ERROR" not in out + err


# --- --help ---------------------------------------------------------------------------------

def test_every_option_has_a_help_text(capsys):
    ap = benchmark.build_parser()
    options = [a for a in ap._actions if a.option_strings and a.help != argparse.SUPPRESS]
    assert {"--heads", "--dim", "--dstate", "--state-dtype", "--z", "--algorithm",
            "--shard"} <= {s for a in options for s in a.option_strings}
    for a in options:
        assert a.help and len(a.help) > 10, a.option_strings
        assert "see above" not in a.help, a.option_strings
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for a in options:
        assert a.option_strings[-1] in out
        assert " ".join(a.help.split()) in out, a.option_strings
    assert "SPEC" not in out and "docs/performance.md" in out


# --- the GPU ceiling ----------------------------------------------------------------------

gpu_only = pytest.mark.skipif("gpu" not in PLATFORMS, reason="needs a GPU and the CUDA module")


@gpu_only
def test_cuda_ceiling_measures_both_methods():
    gpu = jax.devices("gpu")[0]
    c = _copy.cuda_ceiling(gpu, 256 << 20, reps=5, warmup=2)
    for v in (c.memcpy_gbs, c.kernel_gbs, c.gbs, c.seconds):
        assert np.isfinite(v) and v > 0, c
    assert c.bytes == 2 * (256 << 20) and c.buffer_mb == 256 and c.note is None, c
    assert c.gbs == max(c.memcpy_gbs, c.kernel_gbs)
    assert c.method == ("sm_kernel" if c.kernel_gbs > c.memcpy_gbs else "memcpy")
    # two ways of streaming the same bytes through DRAM: within a factor of 2 of each other
    assert 0.5 < c.kernel_gbs / c.memcpy_gbs < 2, c


@gpu_only
def test_cuda_ceiling_shrinks_what_does_not_fit_and_says_so():
    gpu = jax.devices("gpu")[0]
    c = _copy.cuda_ceiling(gpu, 1 << 40, reps=2, warmup=1)  # 2 x 1 TiB: on no card today
    assert 256 <= c.buffer_mb < 2**20 and c.bytes == 2 * c.buffer_mb * 2**20, c
    assert c.note and "2 x 1048576 MiB failed" in c.note and "instead" in c.note, c
    assert np.isfinite(c.gbs) and c.gbs > 0
    with pytest.raises(RuntimeError, match="out of device memory"):
        _copy.cuda_ceiling(gpu, 1 << 40, reps=1, warmup=0, min_nbytes=1 << 40)


@gpu_only
def test_cli_on_the_gpu_is_within_its_ceiling(tmp_path):
    path = tmp_path / "r.json"
    # K = 20 and 10 reps, near the GPU defaults: with K = 8 and 5 reps the wall-clock figure
    # (t(2K) - t(K)) / K once read 108% of copy on an H100 (2026-12-08), below the device time
    rc = benchmark.main(["--platform", "gpu", "--case", "b64-bf16", "--impl", "ffi",
                         "--calls", "20", "--reps", "10", "--cache-mb", "512", "--json",
                         str(path)])
    d = json.loads(path.read_text())
    h = d["header"]
    assert rc == 0, h["ruler_errors"]
    assert h["copy_method"] in ("memcpy", "sm_kernel") and h["copy_mb"] == 1024
    assert h["copy_memcpy_gbs"] > 0 and h["copy_kernel_gbs"] > 0
    assert h["copy_gbs"] == max(h["copy_memcpy_gbs"], h["copy_kernel_gbs"])
    assert h["copy_write_gbs"] > 0
    (row,) = d["rows"]
    # the traced device time: present, and at most the wall time per call (which adds host work)
    # up to timing noise
    assert row["us_per_call"] is not None, "noisy wall time: t(2K) <= t(K)"
    assert row["device_us_per_call"] is not None and row["device_us_per_call"] > 0
    assert row["device_us_per_call"] < 1.2 * row["us_per_call"], row


@gpu_only
@pytest.mark.parametrize("case", ["b8-bf16", "b64-bf16", "b64-fp32", "mtp4-b64-bf16-inter",
                                  "b64-int16"])
def test_auto_is_within_5_percent_of_the_best_explicit_strategy(case):
    """'auto' (the planner's pick from the device's properties) is within 5% of the fastest
    strategy that can run the case, by device time per call of the benchmark's chain (K = 8,
    cold L2, own slots per call; median of 5 traced chains), which unlike the wall time holds no
    host work. Strategies the CUDA planner refuses for the case are left out."""
    import statistics
    c = bc.CASES[case]
    dev = jax.devices("gpu")[0]
    flush = benchmark.make_flush(dev, 256)
    K, times = 8, {}
    for alg in ("auto", "simple", "vertical", "horizontal"):
        arr = benchmark.Arrays(c, K, 1024, dev)
        fn = benchmark.make_fn(jax_mamba.selective_state_update, c, K, alg)
        carry = [arr.carry]

        def once(fn=fn, arr=arr, carry=carry):
            slots = arr.slots(K)
            flush()
            res = fn(carry[0], arr.params, arr.inputs, slots)
            jax.block_until_ready(res)
            carry[0] = res[0]

        try:
            once()  # compiles; a refused strategy fails here
        except ValueError as e:
            assert alg != "auto", e
            continue
        us = [_bench_trace.chain_device_us(_bench_trace.traced_run(once), K) for _ in range(5)]
        assert all(u is not None for u in us), (alg, us)
        times[alg] = statistics.median(us)
        del once, arr, carry  # the cache freed before the next strategy's
    best = min(times, key=times.get)
    assert times["auto"] <= 1.05 * times[best], times


def test_device_time_can_be_switched_off():
    """--no-device-time (used under ncu by scripts/gpu_session.sh): no traced chain."""
    assert benchmark.build_parser().parse_args([]).device_time is True
    assert benchmark.build_parser().parse_args(["--no-device-time"]).device_time is False
