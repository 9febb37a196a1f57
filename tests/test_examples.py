"""The examples run end to end (issue #10 items 4-5), at tiny sizes, in child processes, and
end with a verdict; their --help documents every option with its default (issue #15 item 6).

mamba2_decode: a Mamba-2 model (Flax NNX) decoding token by token through the kernel, the conv
update and the layer-stacked cache must reproduce its full-sequence forward (chunked SSD) and
the reference backend. speculative_decoding: the committed caches equal single-token decoding
of the accepted tokens (SGLang and vLLM styles, varlen) and the tokens equal greedy decoding.
decode_loop (no flax): a donated multi-layer loop in place, equal to jax_mamba.reference.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

needs_flax = pytest.mark.skipif(importlib.util.find_spec("flax") is None,
                                reason="needs flax (pip install '.[examples]')")

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
    verdicts = [l.split()[0] for l in r.stdout.splitlines() if re.match(r"(OK|FAILED)\b", l)]
    # the last verdict is the run's, and the exit status says the same
    assert verdicts and verdicts[-1] == ("OK" if res["ok"] else "FAILED"), tail
    assert (r.returncode == 0) == res["ok"], tail
    return r.returncode, res, tail


@needs_flax
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


@needs_flax
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


def test_decode_loop_in_place_and_equal_to_the_reference():
    rc, res, tail = _run("decode_loop.py", ["--layers", "2", "--batch", "3", "--slots", "5",
                                            "--heads", "4", "--dim", "8", "--dstate", "16",
                                            "--d-model", "32", "--steps", "3"])
    assert rc == 0 and res["ok"] and res["in_place"], tail
    assert res["hidden"] < 1e-4 and res["cache"] < 1e-4, tail


def test_decode_loop_fails_loudly():
    """The verdict can say FAILED: a tolerance no run meets gives FAILED and exit status 1."""
    rc, res, tail = _run("decode_loop.py", ["--layers", "1", "--batch", "2", "--slots", "2",
                                            "--heads", "2", "--dim", "4", "--dstate", "8",
                                            "--d-model", "8", "--steps", "2",
                                            "--tolerance", "-1"])
    assert rc == 1 and not res["ok"], tail


def _options(script):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path), COLUMNS="200")
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--help"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=HERE)
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("options:", 1)[1]
    # one entry per option: "  --name METAVAR   help text (default: x)"
    return {m.group(1): m.group(2) for m in
            re.finditer(r"^  (--[\w-]+)[^\n]*?\s{2,}(.*(?:\n {10,}.*)*)", text, re.M)}


@pytest.mark.parametrize("script", [
    pytest.param("mamba2_decode.py", marks=needs_flax),
    pytest.param("speculative_decoding.py", marks=needs_flax),
    "decode_loop.py"])
def test_example_help_documents_every_option_with_its_default(script):
    opts = _options(script)
    opts.pop("--help", None)
    assert len(opts) >= 8, opts
    for name, text in opts.items():
        text = " ".join(text.split())
        assert "(default: " in text, f"{script} {name}: {text!r}"
        assert len(text.split("(default:")[0].strip()) > 3, f"{script} {name} has no help text"
