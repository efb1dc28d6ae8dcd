"""bench/attention_mass.py's assignment rule (issue 6's attention-mass baseline): chunk 0 FP16, the chunks
with the most mass INT4, the rest INT2 — shared over layers or per layer."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import attention_mass  # noqa: E402
from reference import CODEC_INDEX  # noqa: E402

F16, Q4, Q2 = CODEC_INDEX["fp16"], CODEC_INDEX["int4"], CODEC_INDEX["int2"]


def test_shared_keeps_the_chunks_with_most_mass_summed_over_layers():
    mass = torch.tensor([[9.0, 1.0, 5.0, 2.0, 7.0],
                         [9.0, 4.0, 1.0, 2.0, 0.0]], dtype=torch.float64)  # sums: 18 5 6 4 7
    a = attention_mass.assignment(mass, 0.5, per_layer=False)  # 2 of the 4 non-sink chunks
    assert a.shape == (1, 5, 2)
    assert a[0, :, 0].tolist() == [F16, Q2, Q4, Q2, Q4]
    assert torch.equal(a[0, :, 0], a[0, :, 1])


def test_per_layer_ranks_each_layer_alone():
    mass = torch.tensor([[9.0, 1.0, 5.0, 2.0, 7.0],
                         [9.0, 4.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    a = attention_mass.assignment(mass, 0.25, per_layer=True)  # 1 of 4
    assert a[0, :, 0].tolist() == [F16, Q2, Q2, Q2, Q4]
    assert a[0, :, 1].tolist() == [F16, Q4, Q2, Q2, Q2]


def test_fraction_zero_is_sink_plus_int2():
    a = attention_mass.assignment(torch.rand(3, 6, dtype=torch.float64), 0.0, per_layer=False)
    assert a[0, 0].tolist() == [F16] * 3 and (a[0, 1:] == Q2).all()
