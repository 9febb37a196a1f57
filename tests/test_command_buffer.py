"""XLA command buffers (CUDA graphs): a jitted chain of calls is captured into a
kCommandBuffer thunk and its results are right (docs/jax.md). GPU only; runs in a subprocess so
XLA_FLAGS can ask for a dump."""
import glob
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import PLATFORMS

pytestmark = pytest.mark.skipif("gpu" not in PLATFORMS, reason="needs a GPU and the CUDA module")

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, jax_mamba
    rng = np.random.default_rng(0)
    S, H, P, N, G, b = 64, 8, 64, 64, 2, 4
    state = jnp.asarray(rng.standard_normal((S, H, P, N)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((b, H, P)), jnp.float32)
    dt = jnp.asarray(rng.random((b, H)), jnp.float32)
    A = -jnp.asarray(rng.random(H) + 0.5, jnp.float32)
    B = jnp.asarray(rng.standard_normal((b, G, N)), jnp.float32)
    C = jnp.asarray(rng.standard_normal((b, G, N)), jnp.float32)
    D = jnp.ones((H,), jnp.float32)
    idx = jnp.asarray(rng.permutation(S)[:8 * b].reshape(8, b), jnp.int32)

    def chain(ssu, state):
        outs = []
        for k in range(8):
            r = ssu(state, x * (k + 1), dt, A, B, C, D, dt_softplus=True,
                    state_batch_indices=idx[k])
            state = r.state
            outs.append(r.out)
        return state, jnp.stack(outs)

    got = jax.jit(lambda s: chain(jax_mamba.selective_state_update, s), donate_argnums=0)(
        state.copy())
    cpu = jax.devices("cpu")[0]  # the oracle runs on the CPU so every GPU module is the chain
    with jax.default_device(cpu):
        args = jax.device_put((state, x, dt, A, B, C, D, idx), cpu)
        state, x, dt, A, B, C, D, idx = args
        want = jax.jit(lambda s: chain(jax_mamba.reference.selective_state_update, s))(state)
    err = max(float(jnp.max(jnp.abs(g - w))) / float(jnp.max(jnp.abs(w)))
              for g, w in zip(got, want))
    print("REL_ERR", err)
""")


def test_chain_is_captured_in_a_command_buffer(tmp_path):
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={tmp_path}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # not the repo root: it would shadow the install
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(proc.stdout.split("REL_ERR")[1].split()[0])
    assert err < 1e-4
    dumps = glob.glob(str(tmp_path / "*thunk_sequence*"))
    texts = {os.path.basename(f): open(f).read() for f in dumps}
    listing = "\n".join(f"--- {k}\n{v[:4000]}" for k, v in texts.items())
    print(listing)  # kept in the GPU log for the closing note
    captured = [k for k, v in texts.items() if "kCommandBuffer" in v and "kCustomCall" in v]
    assert captured, f"no command buffer holding the custom calls:\n{listing}"
