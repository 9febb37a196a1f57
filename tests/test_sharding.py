"""jax.jit with a sharded state cache (SPEC §4 multi-device, issue #10 item 1), on 8 host CPU
devices in a child process (the device count is fixed when jax initialises, and this pytest
process has already initialised it).

Each case of tests/sharding_worker.py checks that the sharded, donated call equals the
unsharded one bit for bit, keeps the state's sharding and buffers, and that its compiled HLO has
no collective on a state-sized array (under slot sharding only all-reduces of per-entry arrays:
the out rows, and the rows written to dst slots or intermediate rows, which the "cross" cases
place on other shards than the read slot) and no copy of a donated buffer."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)

GROUPS = {
    "heads": ["heads_stp_gshard", "heads_stp_gslice", "heads_mtp_inter", "heads_varlen_i16",
              "sr_heads", "shard_map_heads", "vmap_heads"],
    "slots": ["slots_stp_pads_invalid", "slots_stp_pad_in_range", "slots_stp_noindex",
              "slots_mtp_dst2d_nacc", "slots_mtp_inter_sharded", "slots_mtp_inter_replicated",
              "slots_varlen_2d", "slots_mamba1_i16_inter", "slots_varlen_noout", "eager_slots"],
    "cross": ["slots_stp_dst1d_cross_i16", "slots_mtp_dst2d_cross",
              "slots_varlen_dst2d_cross_i16", "slots_mtp_dst2d_random", "slots_mtp_dst_disable",
              "slots_mtp_inter_cross_i16", "sr_slots_dst"],
    "mesh2d": ["mesh4x2_mtp_i16", "mesh2x4_stp_gslice", "mesh2x4_varlen_inter",
               "mesh4x2_varlen_dst1d_cross"],
    "fallback": ["fallback_state_on_P", "fallback_G_uneven", "fallback_x_on_batch"],
}


def _worker(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=8").strip(),
               JAX_PLATFORMS="cpu")
    # cwd=tests/: from the repo root the source tree would shadow an installed package
    r = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py")] + args,
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
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
