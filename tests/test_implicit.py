"""Implicit differentiation: gradients equal those of an unrolled solve, gradcheck, backward modes."""

from __future__ import annotations

import pytest
import torch
from small_models import SMALL_CONFIGS, small_input
from torch import Tensor
from torch.func import functional_call

from deq_server.core import IFT, JFB, DEQModel, Phantom, Status

CELL_KINDS = sorted(SMALL_CONFIGS)
TIGHT = {"tol": 1e-13, "max_iter": 1000, "stop_mode": "abs", "method": "anderson"}
TIGHT_IFT = IFT(tol=1e-13, max_iter=1000, stop_mode="abs")


def make_model(kind: str) -> DEQModel:
    return DEQModel.from_config(SMALL_CONFIGS[kind]).double().train()


def unrolled_output(model: DEQModel, x: Tensor, steps: int) -> Tensor:
    """Plain back-propagation through `steps` cell evaluations from zero."""
    inj = model.inject(x)
    z = model.init_state(x)
    for _ in range(steps):
        z = model.cell(z, inj)
    return model.head(z)


def grads(model: DEQModel, x: Tensor, y: Tensor) -> list[Tensor]:
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    loss = (w * y).sum() + (y**2).sum()
    return list(torch.autograd.grad(loss, [x, *model.parameters()]))


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_implicit_gradients_match_unrolled_backprop(kind, gen):
    model = make_model(kind)
    x = small_input(kind, 3, gen).requires_grad_()
    y_impl, result = model(x, backward=TIGHT_IFT, **TIGHT)
    assert result.converged.all()
    g_impl = grads(model, x, y_impl)
    assert result.backward is not None
    assert result.backward.converged.all()

    y_unrolled = unrolled_output(model, x, steps=int(result.iterations.max()) * 3 + 50)
    torch.testing.assert_close(y_impl, y_unrolled, rtol=1e-10, atol=1e-12)
    g_unrolled = grads(model, x, y_unrolled)
    for a, b in zip(g_impl, g_unrolled, strict=True):
        rel = (a - b).norm() / b.norm().clamp_min(1e-30)
        assert rel <= 1e-6


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_gradcheck_through_the_implicit_backward(kind, gen):
    model = make_model(kind)
    x = small_input(kind, 2, gen).requires_grad_()
    name, param = next(iter(model.named_parameters()))
    param = param.detach().clone().requires_grad_()

    def fn(x: Tensor, p: Tensor) -> Tensor:
        y, _ = functional_call(model, {name: p}, (x,), {"backward": TIGHT_IFT, **TIGHT})
        return y

    # The conv cell has many inputs: check random directions there (fast mode) to stay quick.
    assert torch.autograd.gradcheck(
        fn, (x, param), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=kind == "conv"
    )


def test_phantom_with_many_undamped_steps_converges_to_the_implicit_gradient(gen):
    model = make_model("mlp")
    x = small_input("mlp", 4, gen).requires_grad_()
    g_ift = grads(model, x, model(x, backward=TIGHT_IFT, **TIGHT)[0])
    g_ph = grads(model, x, model(x, backward=Phantom(steps=200, damping=1.0), **TIGHT)[0])
    g_short = grads(model, x, model(x, backward=Phantom(steps=2, damping=0.5), **TIGHT)[0])
    for a, b, _c in zip(g_ift, g_ph, g_short, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
    assert any(not torch.allclose(a, c, rtol=1e-3) for a, c in zip(g_ift, g_short, strict=True))


def test_jfb_is_the_gradient_of_one_cell_step_from_the_fixed_point(gen):
    model = make_model("mlp")
    x = small_input("mlp", 4, gen).requires_grad_()
    y, result = model(x, backward=JFB(), **TIGHT)
    manual = model.head(model.cell(result.z.detach(), model.inject(x)))
    for a, b in zip(grads(model, x, y), grads(model, x, manual), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_mode_comes_from_the_config_and_can_be_overridden(gen):
    config = {**SMALL_CONFIGS["mlp"], "backward": {"mode": "phantom", "steps": 3}}
    model = DEQModel.from_config(config).double()
    assert model.config["backward"] == {"mode": "phantom", "steps": 3, "damping": 0.8}
    x = small_input("mlp", 2, gen).requires_grad_()
    _, result = model(x)
    assert result.backward is None  # phantom runs no backward solve
    y, result = model(x, backward="ift")
    y.sum().backward()
    assert result.backward is not None
    assert result.backward.iterations.shape == (2,)
    assert (result.backward.status == Status.CONVERGED).all()


def test_backward_solve_reports_non_convergence_honestly(gen):
    model = make_model("mlp")
    x = small_input("mlp", 3, gen).requires_grad_()
    y, result = model(x, backward=IFT(tol=1e-14, max_iter=2, stop_mode="abs"), **TIGHT)
    y.sum().backward()
    assert result.backward is not None
    assert (result.backward.status == Status.MAX_ITER).all()
    assert (result.backward.iterations == 2).all()
    assert torch.isfinite(x.grad).all()


def test_no_graph_without_grad_and_identical_outputs_in_train_and_eval(gen):
    model = make_model("mlp")
    x = small_input("mlp", 3, gen)
    y_train, _ = model(x, **TIGHT)
    model.eval()
    with torch.no_grad():
        y_eval, _ = model(x, **TIGHT)
    assert y_eval.grad_fn is None
    torch.testing.assert_close(y_train.detach(), y_eval, rtol=0, atol=1e-15)


def saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while `fn()` runs: the graph's memory."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_training_graph_does_not_grow_with_forward_iterations(gen):
    model = make_model("mlp")
    x = small_input("mlp", 8, gen)

    def implicit(n: int) -> int:
        return saved_bytes(lambda: model(x, tol=1e-300, max_iter=n, method="picard"))

    assert implicit(10) == implicit(50) == implicit(200) > 0
    unrolled = [saved_bytes(lambda n=n: unrolled_output(model, x, n)) for n in (10, 200)]
    assert unrolled[1] > 10 * unrolled[0]  # the baseline really grows


def peak_tensor_bytes_of_training_step(step) -> int:
    """High-water mark of tensor memory allocated while `step()` runs (torch profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_training_step_peak_memory_is_flat_in_forward_iterations_unlike_unrolled(gen):
    model = make_model("mlp")
    x = small_input("mlp", 64, gen)

    def implicit(n: int) -> int:
        def step() -> None:
            y, _ = model(x, tol=1e-300, max_iter=n, method="picard")
            y.sum().backward()

        return peak_tensor_bytes_of_training_step(step)

    def unrolled(n: int) -> int:
        return peak_tensor_bytes_of_training_step(
            lambda: unrolled_output(model, x, n).sum().backward()
        )

    assert implicit(200) <= 1.1 * implicit(10)
    assert unrolled(200) > 3 * unrolled(10)


@pytest.mark.parametrize("backward", [TIGHT_IFT, Phantom(steps=3, damping=0.5), JFB()])
def test_trainable_cell_gets_its_gradient_when_the_injection_is_frozen(backward, gen):
    # Fine-tuning only the cell: inj does not require grad, yet W must get the same gradient as
    # when everything is trainable (the injection's requires_grad must not gate the backward).
    model = make_model("mlp")
    x = small_input("mlp", 4, gen)
    y, _ = model(x, backward=backward, **TIGHT)
    (ref,) = torch.autograd.grad((y**2).sum(), [model.layer.W.weight])

    model.layer.injection.requires_grad_(False)
    y, _ = model(x, backward=backward, **TIGHT)
    assert y.requires_grad
    (got,) = torch.autograd.grad((y**2).sum(), [model.layer.W.weight])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)
    assert got.norm() > 0


def test_cell_gradient_with_frozen_injection_matches_finite_differences(gen):
    model = make_model("mlp")
    model.layer.injection.requires_grad_(False)
    x = small_input("mlp", 3, gen)
    weight = model.layer.W.weight

    def loss() -> Tensor:
        y, _ = model(x, backward=TIGHT_IFT, **TIGHT)
        return (y**2).sum()

    (got,) = torch.autograd.grad(loss(), [weight])
    direction = torch.randn(weight.shape, dtype=weight.dtype, generator=gen)
    eps = 1e-6
    with torch.no_grad():
        weight.add_(eps * direction)
        up = loss()
        weight.sub_(2 * eps * direction)
        down = loss()
        weight.add_(eps * direction)
    fd = (up - down) / (2 * eps)
    torch.testing.assert_close((got * direction).sum(), fd, rtol=1e-6, atol=1e-9)
