"""The documentation a user reaches after a pip install (issue #15 item 2): help() on
selective_state_update, and every function sharing its signature, documents every argument
with its shapes, dtype and default; its example runs; docs/shapes.md lists the same arguments."""
import pathlib
import re
import textwrap

import jax
import jax.numpy as jnp
import pytest

import jax_mamba
from jax_mamba._problem import SIGNATURE

SHAPES_MD = pathlib.Path(__file__).resolve().parent.parent / "docs" / "shapes.md"
FUNCTIONS = {
    "selective_state_update": jax_mamba.selective_state_update,
    "reference": jax_mamba.reference.selective_state_update,
    "checked": jax_mamba.checked_selective_state_update,
    "runtime_faults": jax_mamba.runtime_faults,
}


def _args_section(doc):
    """{argument: its text} from the docstring's "Args:" section (entries 'name[, name]: ...'
    indented by two, continuation lines by four)."""
    body = doc.split("\nArgs:\n", 1)[1]
    entries, name = {}, None
    for line in body.splitlines():
        m = re.match(r"^  (\w+(?:, \w+)*): (.*)", line)
        if m:
            names = m.group(1).split(", ")
            for n in names:
                entries[n] = m.group(2)
            name = names
        elif line.startswith("    ") and name:
            for n in name:
                entries[n] += " " + line.strip()
        elif line.strip() == "":
            name = None
        else:
            break
    return entries


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_help_documents_every_argument(fn):
    doc = fn.__doc__
    entries = _args_section(doc)
    names = [n for n, _ in SIGNATURE]
    assert set(entries) == set(names), set(names) ^ set(entries)
    for name, default in SIGNATURE:
        text = entries[name]
        if default is None and name not in ("state", "x", "dt", "A", "B", "C", "D"):
            assert "None" in text, f"{name}: the default None is not documented: {text}"
        elif default is not None:
            assert repr(default) in text.replace('"', "'") or str(default) in text, \
                f"{name}: the default {default!r} is not documented: {text}"


def test_help_names_shapes_per_mode_and_layout():
    doc = jax_mamba.selective_state_update.__doc__
    for words in ("STP", "MTP", "varlen", "Mamba-2", "Mamba-1", "(S, H, P, N)", "(S, P, N)",
                  "(b, H, P)", "(b, T, H, P)", "(TT, H, P)", "Updated in place", "Returns:",
                  "SSUResult", "donate_argnums", "float32", "bfloat16", "float16", "int16",
                  "int32", "int64"):
        assert words in doc, words
    # every array argument states its dtype or dtype rule
    entries = _args_section(doc)
    for name in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_scale", "out",
                 "intermediate_states_buffer", "intermediate_state_scales", "cu_seqlens",
                 "state_batch_indices", "dst_state_batch_indices", "intermediate_state_indices",
                 "num_accepted_tokens"):
        assert re.search(r"dtype|float|int32|int64", entries[name]), (name, entries[name])


def test_help_example_runs():
    doc = jax_mamba.selective_state_update.__doc__
    lines = []
    for line in doc.split("::\n", 1)[1].splitlines():
        if line and not line.startswith("  "):   # the first unindented line ends the example
            break
        lines.append(line)
    code = textwrap.dedent("\n".join(lines))
    assert "selective_state_update" in code, code
    ns = {"jax": jax, "jnp": jnp, "jax_mamba": jax_mamba}
    exec(compile(code, "<docstring example>", "exec"), ns)
    r = ns["r"]
    assert r.out.shape == (3, 4, 8) and r.state.shape == (8, 4, 8, 16)   # as its comment says


def test_shapes_md_lists_every_argument():
    text = SHAPES_MD.read_text()
    for name, default in SIGNATURE:
        assert f"`{name}`" in text, name
        assert f"{name}={default!r}".replace("'", '"') in text or default is None, name
