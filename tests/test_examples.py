"""The examples run end to end (issue #10 items 4-5), at tiny sizes, in child processes.

mamba2_decode: a Mamba-2 model (Flax NNX) decoding token by token through the kernel, the conv
update and the layer-stacked cache must reproduce its full-sequence forward (chunked SSD) and
the reference backend. speculative_decoding: the committed caches equal single-token decoding
of the accepted tokens (SGLang and vLLM styles, varlen) and the tokens equal greedy decoding.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("flax")

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")


def _run(script, args, timeout=300):
    """Runs examples/<script> in a child process and returns its `results:` JSON. cwd=tests/
    and the parent's sys.path: the jax_mamba imported is the one this test session imports
    (the install in CI), not a source tree that happens to be the cwd."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, script)] + args,
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
    line = [l for l in r.stdout.splitlines() if l.startswith("results: ")]
    assert line, f"{script} printed no results (exit {r.returncode}):\n{tail}"
    res = json.loads(line[-1][len("results: "):])
    return r.returncode, res, tail


def test_mamba2_decode_matches_forward_and_reference():
    rc, res, tail = _run("mamba2_decode.py", [
        "--layers", "2", "--d-model", "64", "--d-state", "16", "--headdim", "16",
        "--ngroups", "2", "--vocab", "64", "--batch", "3", "--slots", "5", "--prompt-len", "9",
        "--new-tokens", "6", "--chunk-size", "4"])
    assert rc == 0 and res["ok"], tail
    assert res["in_place"], tail
    for k in ("backends_logits", "backends_state", "decode_vs_forward_logits",
              "decode_vs_forward_state", "decode_vs_forward_conv"):
        assert res[k] < 1e-4, (k, res[k], tail)
    assert res["tokens_per_s"] > 0


def test_speculative_decoding_commits_match_single_token_decoding():
    rc, res, tail = _run("speculative_decoding.py", [
        "--layers", "2", "--d-model", "64", "--d-state", "16", "--headdim", "16",
        "--vocab", "64", "--batch", "3", "--prompt-len", "6", "--draft-context", "4",
        "--draft-tokens", "3", "--rounds", "4"])
    assert rc == 0 and res["ok"], tail
    styles = {r["style"]: r for r in res["runs"]}
    assert set(styles) == {"sglang", "vllm", "vllm-varlen-layer"}
    for r in res["runs"]:
        assert r["committed_vs_single_token_ssm"] <= 1e-5, (r, tail)
        assert r.get("committed_vs_single_token_conv", 0.0) <= 1e-5, (r, tail)
    for s in ("sglang", "vllm"):
        assert styles[s]["same_tokens_as_greedy"], tail
        assert styles[s]["tokens"] >= 3 * 4      # at least one token per sequence and round
