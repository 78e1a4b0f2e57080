"""PolicyWeights, directly: FullCopies (four whole copies) and LoraAdapter (one model, adapter tensors swapped in
place): the frozen copies, the last policy's refresh, the EMA's update, the state round trip and its checks, and that
every copy happens in place (a captured CUDA graph keeps seeing the live tensors)."""

import pytest
import torch
from diffusers.loaders.peft import PeftAdapterMixin
from peft import LoraConfig

from orw_fast.models.policy_weights import FullCopies, LoraAdapter


class Net(torch.nn.Module, PeftAdapterMixin):
    """Two linear layers that LoRA can target, with diffusers' adapter switches (enable/disable_adapters)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.to_q, self.to_k = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.to_k(torch.tanh(self.to_q(x)))


def base_forward(net: Net, x):
    """The model without its adapter, written from the base layers' weights."""
    q, k = (getattr(net, name) for name in ("to_q", "to_k"))
    q, k = (getattr(layer, "base_layer", layer) for layer in (q, k))
    linear = torch.nn.functional.linear
    return linear(torch.tanh(linear(x, q.weight, q.bias)), k.weight, k.bias)


def lora_net(seed: int = 0) -> Net:
    net = Net(seed)
    torch.manual_seed(seed + 1)  # random A and B (peft's default B = 0 would make the adapter a no-op)
    net.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    return net


@torch.no_grad()
def nudge(params, amount: float = 0.1) -> None:
    """A stand-in for an optimizer step: every trainable tensor changes, in place."""
    for i, p in enumerate(params):
        p.add_(amount * (i + 1))


def clones(params):
    return [p.detach().clone() for p in params]


def assert_equal(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- FullCopies -----------------------------------------------------------------------------------------------


def test_full_copies_are_frozen_separate_copies_and_the_last_policy_moves_only_on_refresh():
    module = Net()
    weights = FullCopies(module, ema=True)
    start = clones(module.parameters())
    copies = (weights.reference_module, weights.last_policy_module, weights.ema_module)
    for copy in copies:
        assert not copy.training and not any(p.requires_grad for p in copy.parameters())
        assert_equal(list(copy.parameters()), start)
    assert weights.trainable_parameters() == list(module.parameters())
    nudge(module.parameters())
    with weights.last_policy() as last, weights.reference() as reference:
        assert last is weights.last_policy_module and reference is weights.reference_module
        assert_equal(list(last.parameters()), start)
    pointers = [p.data_ptr() for p in weights.last_policy_module.parameters()]
    weights.refresh_last_policy()
    assert_equal(list(weights.last_policy_module.parameters()), list(module.parameters()))
    assert [p.data_ptr() for p in weights.last_policy_module.parameters()] == pointers  # in place
    assert_equal(list(weights.reference_module.parameters()), start)  # the reference never moves


def test_full_copies_ema_follows_the_lerp_formula():
    module = Net()
    weights = FullCopies(module, ema=True)
    ema = clones(weights.ema_module.parameters())
    nudge(module.parameters())
    weights.update_ema(0.9)
    expected = [0.9 * e.double() + 0.1 * p.detach().double() for e, p in zip(ema, module.parameters())]
    for got, want in zip(weights.ema_module.parameters(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    FullCopies(Net(), ema=False).update_ema(0.9)  # no EMA: nothing to do, no error


def test_full_copies_states_round_trip_and_a_missing_ema_starts_from_the_policy():
    weights = FullCopies(Net(0), ema=True)
    nudge(weights.module.parameters())
    weights.update_ema(0.5)
    nudge(weights.module.parameters())
    states = weights.states()
    other = FullCopies(Net(1), ema=True)
    other.check_states(states, "ckpt")
    other.load_states(states)
    for key, module in other._named().items():
        assert_equal(list(module.state_dict().values()), list(states[key].values()))
    other.load_states({**states, "ema": None})
    assert_equal(list(other.ema_module.parameters()), list(other.module.parameters()))


@pytest.mark.parametrize(
    "broken, match",
    [
        (lambda s: {k: v for k, v in s.items() if k != "last_policy"}, "ckpt has no entry 'last_policy'"),
        (lambda s: {**s, "reference": {**s["reference"], "to_q.weight": torch.zeros(2, 2)}}, "ckpt, entry 'reference'"),
    ],
)
def test_full_copies_refuse_states_that_do_not_fit(broken, match):
    weights = FullCopies(Net(), ema=True)
    with pytest.raises(ValueError, match=match):
        weights.check_states(broken(weights.states()), "ckpt")


# -- LoraAdapter ----------------------------------------------------------------------------------------------


def test_lora_adapter_trains_only_the_adapter_in_float32_and_the_reference_is_the_base_model():
    net = lora_net()
    weights = LoraAdapter(net.to(torch.bfloat16), ema=False)
    assert weights.names and all("lora_" in n for n in weights.names)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in weights.trainable_parameters())
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    with torch.no_grad(), weights.reference() as reference:
        torch.testing.assert_close(reference(x), base_forward(net, x), rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.equal(net(x), base_forward(net, x))  # the adapter is back on after the context


def test_lora_adapter_swaps_the_last_policy_in_and_restores_the_policy_exactly():
    net = lora_net()
    weights = LoraAdapter(net, ema=False)
    x = torch.randn(5, 6)
    with torch.no_grad():
        before = net(x)
    nudge(weights.params)
    policy, pointers = clones(weights.params), [p.data_ptr() for p in weights.params]
    with torch.no_grad(), weights.last_policy() as module:
        assert module is net
        torch.testing.assert_close(module(x), before, rtol=0, atol=0)  # the adapter as it was at the start
    assert_equal(weights.params, policy)
    assert [p.data_ptr() for p in weights.params] == pointers  # swapped by copying, never replaced
    weights.refresh_last_policy()
    with torch.no_grad(), weights.last_policy() as module:
        torch.testing.assert_close(module(x), net(x), rtol=0, atol=0)


def test_lora_adapter_ema_and_states_round_trip():
    weights = LoraAdapter(lora_net(0), ema=True)
    ema = clones(weights.params)
    nudge(weights.params)
    weights.update_ema(0.75)
    for got, e, p in zip(weights._ema, ema, weights.params):
        torch.testing.assert_close(got.double(), 0.75 * e.double() + 0.25 * p.detach().double(), rtol=1e-6, atol=1e-7)
    weights.refresh_last_policy()
    nudge(weights.params)
    states = weights.states()
    assert states["reference"] is None and set(states["policy"]) == set(weights.names)
    other = LoraAdapter(lora_net(1), ema=True)
    other.check_states(states, "ckpt")
    other.load_states(states)
    assert_equal(other.params, weights.params)
    assert_equal(other._last, weights._last)
    assert_equal(other._ema, weights._ema)
    other.load_states({**states, "ema": None})
    assert_equal(other._ema, other.params)


def test_lora_adapter_refuses_other_adapters_and_a_model_without_one():
    weights = LoraAdapter(lora_net(), ema=False)
    states = weights.states()
    other = Net()
    other.add_adapter(LoraConfig(r=3, target_modules=["to_q"], init_lora_weights=False))
    with pytest.raises(ValueError, match="entry 'policy' holds other LoRA weights"):
        LoraAdapter(other, ema=False).check_states(states, "ckpt")
    with pytest.raises(ValueError, match="ckpt has no entry 'ema'"):
        weights.check_states({k: v for k, v in states.items() if k != "ema"}, "ckpt")
    with pytest.raises(ValueError, match="no trainable"):
        LoraAdapter(Net().requires_grad_(False), ema=False)


def test_the_ema_context_gives_the_ema_and_refuses_weights_without_one():
    full = FullCopies(Net(), ema=True)
    with full.ema() as module:
        assert module is full.ema_module
    weights = LoraAdapter(lora_net(), ema=True)
    x = torch.randn(5, 6)
    with torch.no_grad():
        before = weights.module(x)
    nudge(weights.params)
    policy = clones(weights.params)
    with torch.no_grad(), weights.ema() as module:
        torch.testing.assert_close(module(x), before, rtol=0, atol=0)  # the EMA: still the adapter at the start
    assert_equal(weights.params, policy)
    for without in (FullCopies(Net(), ema=False), LoraAdapter(lora_net(), ema=False)):
        with pytest.raises(RuntimeError, match="these policy weights keep no EMA"), without.ema():
            pass
