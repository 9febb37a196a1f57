"""jax.jit with a sharded state cache (docs/sharding.md; issue #10 item 1, #18), on 8 host CPU
devices in a child process (the device count is fixed when jax initialises, and this pytest
process has already initialised it).

Each case of tests/sharding_worker.py checks that the sharded, donated call equals the
unsharded one bit for bit, keeps the state's sharding and buffers, and that its compiled HLO has
no collective on a state-sized array (under slot sharding only all-reduces of per-entry arrays:
the out rows, and the rows written to dst slots or intermediate rows, which the "cross" cases
place on other shards than the read slot) and no copy of a donated buffer.

test_two_devices runs a representative subset on a 2-device mesh (issue #11): on 2 forced host
CPU devices always, on 2 GPUs when this machine has them (SHARDING_PLATFORM=gpu; the GPU runner's
`multigpu` stage: pytest -k gpu tests/test_sharding.py); test_every_case_on_two_gpus runs every
case there (the 2-D meshes are skipped on 2 devices)."""
import os
import subprocess
import sys

import jax
import pytest

import jax_mamba

HERE = os.path.dirname(__file__)

GROUPS = {
    "heads": ["heads_stp_gshard", "heads_stp_gslice", "heads_G_straddle",
              "heads_mtp_straddle_i16_inter", "heads_mtp_inter", "heads_varlen_i16", "sr_heads",
              "shard_map_heads", "vmap_heads"],
    # every (H, G, shards) with H divisible by the shard count (issue #18)
    "head_splits": ["head_splits"],
    "slots": ["slots_stp_pads_invalid", "slots_stp_pad_in_range", "slots_stp_noindex",
              "slots_mtp_dst2d_nacc", "slots_mtp_inter_sharded", "slots_mtp_inter_replicated",
              "slots_varlen_2d", "slots_mamba1_i16_inter", "slots_varlen_noout", "eager_slots"],
    "cross": ["slots_stp_dst1d_cross_i16", "slots_stp_dst1d_extremes",
              "slots_stp_dst1d_extremes_x64", "slots_mtp_dst2d_cross",
              "slots_varlen_dst2d_cross_i16", "slots_mtp_dst2d_random", "slots_mtp_dst_disable",
              "slots_mtp_inter_cross_i16", "sr_slots_dst"],
    "mesh2d": ["mesh4x2_mtp_i16", "mesh2x4_stp_gslice", "mesh2x4_mtp_gstraddle",
               "mesh2x4_varlen_inter", "mesh4x2_varlen_dst1d_cross"],
    "fallback": ["fallback_state_on_P", "fallback_heads_uneven", "fallback_x_on_batch"],
}


# on 2 devices: heads STP / MTP with intermediates / varlen int16 / groups straddling the two
# shards (6 heads, 3 groups) / every head split that fits; slots with pads and invalid
# indices, int16 with a sharded intermediate buffer, dst slots on the other shard (bf16: on GPU
# the native bf16 scatter), varlen int16 with cross-shard dst, cross-shard intermediate rows
TWO_DEVICE = ["heads_stp_gshard", "heads_mtp_inter", "heads_varlen_i16",
              "heads_mtp_straddle_i16_inter", "head_splits", "slots_stp_pads_invalid",
              "slots_mtp_inter_sharded", "slots_mtp_dst2d_cross", "slots_varlen_dst2d_cross_i16",
              "slots_mtp_inter_cross_i16"]
# NVLink multicast stays off wherever NCCL may run (the device notes: it can take the host's
# GPUs out of service)
NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                    NVSHMEM_DISABLE_NVLS="1")


def _gpu_count():
    try:
        return len(jax.devices("gpu")) if jax_mamba.HAS_CUDA else 0
    except RuntimeError:
        return 0


def _worker(args, timeout=300, devices=None, platform="cpu"):
    """The worker's stdout; devices=None: its default (8 host CPU devices)."""
    if platform == "cpu":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path),
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                              " --xla_force_host_platform_device_count=8").strip(),
                   JAX_PLATFORMS="cpu", SHARDING_PLATFORM="cpu", SHARDING_KEEP_GOING="0")
    else:  # the GPUs: no forced host devices, no JAX_PLATFORMS=cpu, memory shared with us;
        # every failing case reported (a GPU run is rare), not only the first
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path),
                   SHARDING_PLATFORM=platform, XLA_PYTHON_CLIENT_PREALLOCATE="false",
                   SHARDING_KEEP_GOING="1", **NO_MULTICAST)
        env.pop("JAX_PLATFORMS", None)
    env["SHARDING_DEVICES"] = str(devices or 8)
    # cwd=tests/: from the repo root the source tree would shadow an installed package
    r = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py")] + args,
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL ")]
    tail = "\n".join(fails + (r.stdout + r.stderr).splitlines()[-30:])
    assert r.returncode == 0, f"sharding worker exited with {r.returncode}:\n{tail}"
    return r.stdout


def test_every_case_is_in_a_group():
    listed = set(_worker(["list"]).split())
    grouped = {c for cases in GROUPS.values() for c in cases}
    assert listed == grouped, (listed - grouped, grouped - listed)


@pytest.mark.parametrize("group", list(GROUPS))
def test_sharded_cases(group):
    out = _worker(GROUPS[group])
    done = [line.split()[1] for line in out.splitlines() if line.startswith("ok ")]
    assert done == GROUPS[group], out


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_two_devices(platform):
    if platform == "gpu" and _gpu_count() < 2:
        pytest.skip(f"needs 2 GPUs with the CUDA handlers built ({_gpu_count()} usable)")
    out = _worker(TWO_DEVICE, devices=2, platform=platform)
    assert out.splitlines()[0].startswith("devices: 2 x "), out
    done = [line.split()[1] for line in out.splitlines() if line.startswith("ok ")]
    assert done == TWO_DEVICE, out


def test_every_case_on_two_gpus():
    if _gpu_count() < 2:
        pytest.skip(f"needs 2 GPUs with the CUDA handlers built ({_gpu_count()} usable)")
    cases = [c for cases in GROUPS.values() for c in cases]
    out = _worker(cases, timeout=420, devices=2, platform="gpu")
    done = [line.split()[1] for line in out.splitlines() if line.startswith("ok ")]
    skipped = [line.split()[1] for line in out.splitlines() if line.startswith("skip ")]
    assert set(skipped) == set(GROUPS["mesh2d"]), out
    assert done == [c for c in cases if c not in skipped], out
