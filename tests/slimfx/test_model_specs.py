"""A MODEL spec's factory runs the same way in every command: seeded and on one torch thread."""

from __future__ import annotations

import textwrap

import torch

from slimfx.loading import resolve_model

FACTORY = textwrap.dedent("""
    import torch, torch.nn as nn

    def make():  # weights that depend on how the factory ran, as a factory that trains them does
        m = nn.Linear(4, 2)
        with torch.no_grad():
            m.bias.fill_(torch.get_num_threads())
            m.weight.copy_(torch.randn(2, 4))
        return m.eval(), (torch.randn(1, 4),)
""")


def test_a_factory_builds_the_same_model_whatever_the_commands_thread_count(tmp_path):
    """compile --threads 2 and validate (default threads) built different models from a factory that trained its
    weights (float sums differ between thread counts), and validate failed a good file."""
    (tmp_path / "net.py").write_text(FACTORY)
    before = torch.get_num_threads()
    try:
        built = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            built.append(resolve_model(f"{tmp_path / 'net.py'}:make").module)
            assert torch.get_num_threads() == threads  # the command's own setting is restored
        assert [float(m.bias[0]) for m in built] == [1.0, 1.0]
        assert torch.equal(built[0].weight, built[1].weight)  # seeded
    finally:
        torch.set_num_threads(before)
