"""Bai et al. 2019, Thm 3: an explicit MLP equals a weight-tied DEQ with a nilpotent state matrix."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from deq_server.core import Status, mlp_to_deq

ACTIVATION_MODULES = [nn.Tanh, nn.ReLU, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, None]


@st.composite
def mlps(draw: st.DrawFn) -> nn.Sequential:
    depth = draw(st.integers(min_value=2, max_value=6))
    sizes = draw(st.lists(st.integers(1, 9), min_size=depth + 1, max_size=depth + 1))
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers.append(nn.Linear(a, b))
        act = draw(st.sampled_from(ACTIVATION_MODULES))
        if act is not None:
            layers.append(act())
    return nn.Sequential(*layers).double()


@settings(max_examples=40, deadline=None)
@given(mlp=mlps(), batch=st.integers(1, 5), data=st.data())
def test_deq_fixed_point_reproduces_the_mlp_and_its_gradients(mlp, batch, data):
    depth = sum(isinstance(m, nn.Linear) for m in mlp)
    deq = mlp_to_deq(mlp)
    seed = data.draw(st.integers(0, 2**31 - 1))
    x = torch.randn(
        batch,
        mlp[0].in_features,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(seed),
    )

    x1 = x.clone().requires_grad_()
    y_mlp = mlp(x1)
    x2 = x.clone().requires_grad_()
    y_deq, result = deq(x2)

    assert (result.status == Status.CONVERGED).all()
    assert (result.iterations <= depth + 1).all()
    torch.testing.assert_close(y_deq, y_mlp, rtol=0, atol=1e-10)

    w = torch.randn(y_mlp.shape, dtype=torch.float64)
    g_mlp = torch.autograd.grad((w * y_mlp).sum(), [x1, *mlp.parameters()])
    g_deq = torch.autograd.grad((w * y_deq).sum(), [x2, *deq.parameters()])
    for a, b in zip(g_deq, g_mlp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert result.backward is not None
    assert (result.backward.status == Status.CONVERGED).all()
    assert (result.backward.iterations <= depth + 1).all()


def test_state_matrix_is_block_sub_diagonal_and_nilpotent():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    cell = mlp_to_deq(mlp.double()).layer
    w_z, u = cell.W_z, cell.U
    assert w_z.shape == (11, 11)
    assert u.shape == (11, 3)
    torch.testing.assert_close(u[:4], mlp[0].weight)
    assert torch.count_nonzero(u[4:]) == 0
    torch.testing.assert_close(w_z[4:9, :4], mlp[2].weight)
    torch.testing.assert_close(w_z[9:, 4:9], mlp[4].weight)
    mask = torch.zeros(11, 11, dtype=torch.bool)
    mask[4:9, :4] = True
    mask[9:, 4:9] = True
    assert torch.count_nonzero(w_z[~mask]) == 0
    power = torch.linalg.matrix_power(w_z, 3)
    assert torch.count_nonzero(power) == 0
    assert torch.count_nonzero(torch.linalg.matrix_power(w_z, 2)) > 0


def test_float32_conversion_is_exact_too():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    deq = mlp_to_deq(mlp).eval()
    x = torch.randn(16, 6)
    with torch.no_grad():
        y, result = deq(x)
        torch.testing.assert_close(y, mlp(x), rtol=1e-6, atol=1e-6)
    assert (result.iterations == 4).all()


@pytest.mark.parametrize(
    ("layers", "match"),
    [
        ([nn.Tanh(), nn.Linear(2, 2)], "must be nn.Linear"),
        ([nn.Linear(2, 3), nn.Tanh(), nn.ReLU()], "one activation per Linear"),
        ([nn.Linear(2, 3), nn.Linear(4, 2)], "do not chain"),
        ([nn.Linear(2, 3), nn.Dropout()], "unsupported activation"),
        ([nn.Linear(2, 3), nn.LeakyReLU(0.2)], "unsupported activation"),
        ([nn.Linear(2, 3, bias=False)], "must have a bias"),
        ([], "no nn.Linear"),
    ],
)
def test_unsupported_mlps_are_refused_with_a_reason(layers, match):
    with pytest.raises(ValueError, match=match):
        mlp_to_deq(nn.Sequential(*layers))
