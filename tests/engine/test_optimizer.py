import pytest
import torch

from maskrcnn.config import SolverConfig
from maskrcnn.engine.optimizer import build_optimizer, dense_layout, param_groups


def test_norm_parameters_get_no_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.BatchNorm2d(4),
                                torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight), id(model[3].bias)}
    assert len(no_decay["params"]) == 4


def test_optimizer_choice():
    groups = param_groups(torch.nn.Linear(2, 2), 1e-4)
    sgd = build_optimizer(SolverConfig(base_lr=0.1, momentum=0.8), groups)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(SolverConfig(optimizer="adamw", base_lr=1e-3, momentum=0.85), groups)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.85, 0.999)
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-4, 0.0]


def test_the_optimizer_is_the_fused_kernel_with_the_plain_loop_as_fallback(monkeypatch):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
    solver = SolverConfig(optimizer="adamw", base_lr=0.01)
    fused = build_optimizer(solver, groups)
    assert fused.defaults["fused"] and all(g["fused"] for g in fused.param_groups)
    loop = torch.optim.AdamW([dict(g, params=[p.detach().clone().requires_grad_() for p in g["params"]])
                              for g in groups], lr=0.01, betas=(0.9, 0.999))
    for _ in range(3):
        for a, b in zip(params, [p for g in loop.param_groups for p in g["params"]]):
            a.grad = b.grad = torch.ones_like(a)
        fused.step(), loop.step()
    for a, b in zip(params, [p for g in loop.param_groups for p in g["params"]]):
        torch.testing.assert_close(a, b)  # the same update

    real = torch.optim.AdamW

    def without_fused_kernels(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be on supported devices: ['cuda']")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", without_fused_kernels)
    plain = build_optimizer(solver, groups)
    assert not plain.defaults["fused"] and not any(g.get("fused") for g in plain.param_groups)


def _convs(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # a 4 -> 5 3x3 conv, a 3 -> 3 one (the same shape in both layouts), a 1x1 conv and a linear
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 5, 3), torch.nn.Conv2d(5, 3, 1),
                                torch.nn.Conv2d(3, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 2))
    return model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_dense_layout_steps_the_same_values_and_restores_every_layout(name):
    solver = SolverConfig(optimizer=name, base_lr=0.05, momentum=0.9)
    dense, plain = _convs(0), _convs(0)
    opts = {m: build_optimizer(solver, param_groups(m, 1e-2)) for m in (dense, plain)}
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    weight = dense[0].weight
    for it in range(3):
        for model, opt in opts.items():
            opt.zero_grad()
            model(x).square().sum().backward()
        if it == 1:  # state as restored from a checkpoint of plain tensors
            for state in opts[dense].state.values():
                state.update({k: v.contiguous() for k, v in state.items() if v.dim() == 4})
        with dense_layout(opts[dense]):
            assert weight.shape == weight.grad.shape == (5, 3, 3, 4) and weight.is_contiguous()
            opts[dense].step()
        opts[plain].step()
        for a, b in zip(dense.parameters(), plain.parameters()):
            assert torch.equal(a, b)
    assert weight is dense[0].weight and weight.shape == weight.grad.shape == (5, 4, 3, 3)
    for p in dense.parameters():
        assert p.grad.shape == p.shape
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
            for value in opts[dense].state[p].values():
                if value.dim() == 4:
                    assert value.shape == p.shape and value.is_contiguous(memory_format=torch.channels_last)
