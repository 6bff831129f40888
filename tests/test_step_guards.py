"""The compiled decode step checks dynamo's guards on the model once per generate call, not before every step
(dsv3/generation/step_guards.py): the compiled step still equals eager; a model changed between calls, and a second
model, get their own graph; on a torch without the guard table every guard stays with dynamo (logged)."""

from __future__ import annotations

import logging

import pytest
import torch

from dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
from dsv3.generation import step_guards
from dsv3.generation.generate import DecodeStep, generate

LOGGER = "dsv3.generation.step_guards"
OPTS = dict(max_new_tokens=6, cache_implementation="static", eos_token_id=[], do_sample=False)


def tiny(seed: int, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.tiny(**overrides)).eval()
    with torch.no_grad():   # spread the router so routing is decisive (and a change of it shows in the tokens)
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
            layer.mlp.gate.weight.normal_(0, 0.3)
    return model


def compiled_equals_eager(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> DecodeStep:
    eager = generate(model, ids, **OPTS)
    out = generate(model, ids, **OPTS, compile=True, return_dict_in_generate=True)
    assert out.compiled_steps == OPTS["max_new_tokens"] - 1, "the compiled step fell back to eager"
    assert torch.equal(out.sequences, eager), f"compiled {out.sequences.tolist()} != eager {eager.tolist()}"
    return DecodeStep(model, compile=True)   # the step the next generate call would build: same code, checked


@pytest.mark.slow   # compiles three decode steps
def test_model_guards_are_checked_per_call_and_a_changed_model_compiles_again(caplog: pytest.LogCaptureFixture
                                                                               ) -> None:
    model = tiny(3)
    ids = torch.randint(2, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        step = compiled_equals_eager(model, ids)
    assert step.step_code is not None, "the step kept every guard in dynamo on a torch that can take them over"
    guards = step.step_code.guards
    assert "checked once per generate call" in caplog.text
    # The model's guards (module types, hook dicts, parameter metadata, config values) left dynamo's per-step
    # check; what stays are the inputs', the cache's and the global state's.
    assert len(guards.deferred) > 10 * guards.kept, (len(guards.deferred), guards.kept)
    assert all("L['self']" in d.name or d.name.startswith("G[") for d in guards.deferred)
    assert guards.failure(step) is None
    first_code = step.step_code.function.__code__

    # Between calls, route each token to fewer experts: the graph has top_k baked in. A step that ran the old
    # graph would give the old tokens; the check sees the changed constant and the step compiles again.
    for layer in model.model.layers[model.config.first_k_dense_replace:]:
        layer.mlp.gate.top_k = 1
    failed = guards.failure(DecodeStep(model, moe_dispatch=step.moe_dispatch))   # (an eager step: builds nothing)
    assert failed is not None and failed.endswith(".top_k"), failed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        step = compiled_equals_eager(model, ids)
    assert "no longer holds" in caplog.text and "top_k" in caplog.text
    assert step.step_code.function.__code__ is not first_code


@pytest.mark.slow   # compiles two decode steps
def test_two_models_keep_their_own_graphs() -> None:
    """Same class and shapes, a different constant the graph bakes in (top_k): neither model runs the other's
    graph, and decoding with the second does not evict the first's (each model has its own code object)."""
    a, b = tiny(3), tiny(3, num_experts_per_tok=1)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(2, a.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    assert not torch.equal(generate(a, ids, **OPTS), generate(b, ids, **OPTS)), "the models must differ"
    step_a = compiled_equals_eager(a, ids)
    step_b = compiled_equals_eager(b, ids)
    assert step_b.step_code is not step_a.step_code
    assert DecodeStep(a, compile=True).step_code is step_a.step_code, "b's compile replaced a's graph"


def test_without_the_guard_table_dynamo_keeps_every_guard(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(step_guards, "GUARD_VALUE_DISPATCH", None)
    with caplog.at_level(logging.INFO, logger="dsv3.generation.generate"):
        step = DecodeStep(tiny(1), compile=True)     # torch.compile is lazy: nothing compiles here
    assert step.compiled and step.step_code is None
    assert "cannot take guards over from dynamo" in caplog.text


class _Toy:
    def __init__(self) -> None:
        w = torch.randn(4, 4)
        self.a, self.b, self.k = w, w, 3          # one tensor under two names: dynamo's DUPLICATE_INPUT guard

    def run(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a + x @ self.b * self.k


def test_taken_guards_fail_when_their_source_changes() -> None:
    """The guards on `self` leave dynamo, those on the other locals and the global state stay; each taken guard
    fails once what it guarded changes — a constant, a tensor's metadata, one object seen under two names."""
    import types

    toy = _Toy()
    code = step_guards.step_code(torch.nn.Linear(1, 1), "toy", _Toy.run, toy)
    fn = torch.compile(types.MethodType(code.function, toy), backend="eager", fullgraph=True,
                       options={"guard_filter_fn": code.guard_filter(toy)})
    x = torch.randn(2, 4)
    assert torch.equal(fn(x), toy.run(x))
    taken = {(d.kind, d.name) for d in code.guards.deferred}
    assert {("TYPE_MATCH", "L['self']"), ("TENSOR_MATCH", "L['self'].a"), ("CONSTANT_MATCH", "L['self'].k"),
            ("DUPLICATE_INPUT", "L['self'].b")} <= taken, taken
    assert not any("L['x']" in name for _, name in taken) and code.guards.kept >= 2   # x's guard, global state
    assert code.guards.failure(toy) is None
    x3 = torch.randn(3, 4)
    assert torch.equal(fn(x3), toy.run(x3))        # a new shape: dynamo compiles again, the same guards handed over
    assert len(code.guards.deferred) == len(taken), "a recompile's guards were taken over twice"
    toy.b = toy.a.clone()
    assert code.guards.failure(toy) == "DUPLICATE_INPUT on L['self'].b"
    toy.b, toy.k = toy.a, 4
    assert code.guards.failure(toy) == "CONSTANT_MATCH on L['self'].k"
    toy.k, toy.a = 3, torch.randn(4, 5)
    assert code.guards.failure(toy).startswith(("TENSOR_MATCH on L['self'].a", "DUPLICATE_INPUT"))
    del toy.a
    assert code.guards.failure(toy) is not None     # a source that no longer resolves fails its guard
