"""Layer coverage of LLMs with the default recipe: GPT-2's Conv1D and fused MoE experts.

Tiny configs with random weights and fixed seeds. Each architecture: at most 5 % of the
non-embedding matrix bytes stay float, subclass and module forms give identical logits and
greedy tokens, the logits' SQNR against the float model stays above a floor, save/load round-trips.
Per-expert input statistics are checked against a reference computed by routing the tokens here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inc_bridge as ib
from inc_bridge.coverage import matrix_bytes
from inc_bridge.experts import MATRICES
from inc_bridge.formats import ACTIVATION_BACKOFF
from inc_bridge.quant import inc_activation_scale

from .models import inc_reference

transformers = pytest.importorskip("transformers")

SQNR_FLOOR_DB = 20.0  # torchao's bar for a quantized layer's output; these logits measure 26.2-34.8 dB
VOCAB = 96


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                                                n_head=4, bos_token_id=0, eos_token_id=0))


def _mixtral(experts=4, top_k=2):
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=64))


def _qwen2_moe():
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2, max_position_embeddings=64))


def _olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


ARCHS = {"gpt2": _gpt2, "qwen2_moe": _qwen2_moe, "mixtral": _mixtral, "olmoe": _olmoe}
MOE = ["qwen2_moe", "mixtral", "olmoe"]


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch]().eval()


def _batches(n: int = 3, seq: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, seq), generator=g)} for _ in range(n)]


def _sqnr(ref: torch.Tensor, q: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - q).pow(2).sum()))


def _experts_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__.endswith("Experts")]


@pytest.fixture(scope="module")
def quantized():
    """arch -> (float model, subclass form, module form), built once for the tests below."""
    built = {}

    def get(arch: str):
        if arch not in built:
            model = _model(arch)
            built[arch] = (model, ib.quantize(model, _batches()), ib.quantize(model, _batches(), form="module"))
        return built[arch]

    return get


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_recipe_leaves_little_float_and_both_forms_agree(arch, quantized):
    model, qsub, qmod = quantized(arch)
    result = ib.conversion_result(qsub)
    embeddings = sum(matrix_bytes(m)[0] for m in model.modules() if isinstance(m, nn.Embedding))
    total = matrix_bytes(model)[0] - embeddings  # tied lm_head counted once, with the embedding
    left = sum(f.nbytes for f in result.float_left if f.module_type != "Embedding")
    print(f"\n{arch}: {left} of {total} non-embedding matrix bytes left float ({100 * left / total:.2f} %)")
    print(result.summary())
    assert left <= 0.05 * total
    types = result.by_type()
    expected = "Conv1D" if arch == "gpt2" else next(t for t in types if t.endswith("Experts"))
    assert types[expected][0] >= 2 and types[expected][2] * 4 == types[expected][1]  # fp32 -> 1 byte per element
    assert f"converted {expected}: " in result.summary()
    ids = _batches(1, seed=7)[0]["input_ids"]
    with torch.no_grad():
        ref, a, b = model(ids).logits, qsub(ids).logits, qmod(ids).logits
    assert torch.equal(a, b)
    sqnr = _sqnr(ref, a)
    print(f"{arch}: logits SQNR vs float {sqnr:.2f} dB (floor {SQNR_FLOOR_DB} dB)")
    assert sqnr > SQNR_FLOOR_DB
    prompt = ids[:1, :4]
    gen_sub = qsub.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    gen_mod = qmod.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen_sub.shape == (1, 8) and torch.equal(gen_sub, gen_mod)


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
@pytest.mark.parametrize("form", ["subclass", "module"])
def test_save_load_round_trip(arch, form, quantized, tmp_path):
    _, qsub, qmod = quantized(arch)
    q = qsub if form == "subclass" else qmod
    ib.save(q, tmp_path / "m")
    torch.manual_seed(5)
    loaded = ib.load(ARCHS[arch]().eval(), tmp_path / "m")
    ids = _batches(1, seed=8)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
    assert set(ib.conversion_result(loaded).converted) == set(ib.conversion_result(q).converted)
    if arch == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # the float tie survives


def _routing_reference(model: nn.Module, batches: list[dict]) -> dict[str, tuple[list, list, list]]:
    """Per experts layer: tokens per expert and the amax of each expert's gate_up and down inputs,
    computed here from the routing the float model does (eager experts)."""
    captured: dict[str, list] = {}
    hooks = []
    for name in _experts_layers(model):
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, name=name: captured.setdefault(name, []).append((args[0], args[1]))))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    ref = {}
    for name, calls in captured.items():
        module = model.get_submodule(name)
        e_count = module.gate_up_proj.shape[0]
        tokens, gu, down = [0] * e_count, [0.0] * e_count, [0.0] * e_count
        for hidden, top_k_index in calls:
            for e in range(e_count):
                _, token_idx = torch.where((top_k_index == e).T)  # the eager loop's row order
                rows = hidden[token_idx]
                if rows.shape[0] == 0:
                    continue
                tokens[e] += rows.shape[0]
                gate, up = F.linear(rows, module.gate_up_proj[e]).chunk(2, dim=-1)
                inter = module.act_fn(gate) * up
                gu[e] = max(gu[e], float(rows.detach().abs().max()))
                down[e] = max(down[e], float(inter.detach().abs().max()))
        ref[name] = (tokens, gu, down)
    return ref


@pytest.mark.parametrize("arch", MOE)
def test_per_expert_input_amax_is_that_of_the_tokens_routed_to_each_expert(arch):
    model = _model(arch)
    model.set_experts_implementation("eager")  # the reference runs F.linear per expert, as eager does
    batches = _batches()
    ref = _routing_reference(model, batches)
    meas = ib.calibrate(model, batches)
    scales = ib.compute_scales(meas, model=model)
    for name, (tokens, gu, down) in ref.items():
        stats = meas[name]
        assert list(stats.expert_tokens) == tokens and sum(tokens) == 3 * 2 * 12 * 2  # every token, top-2
        assert list(stats.expert_input_amax[0]) == gu and list(stats.expert_input_amax[1]) == down
        ls = scales[name]
        for m, amax in enumerate((gu, down)):
            want = torch.tensor(amax, dtype=torch.float32) / (448.0 * ACTIVATION_BACKOFF)
            assert torch.equal(ls.expert_input_scales[m], want)
    # The default grouped_mm implementation routes the same rows: the gate_up inputs are the same tokens.
    grouped = ib.calibrate(_model(arch), batches)
    for name, (tokens, gu, _) in ref.items():
        assert list(grouped[name].expert_tokens) == tokens and list(grouped[name].expert_input_amax[0]) == gu


@pytest.mark.parametrize("form", ["subclass", "module"])
def test_fp8_experts_carry_the_per_expert_scales(form, quantized):
    model, qsub, qmod = quantized("mixtral")
    q = qsub if form == "subclass" else qmod
    name = _experts_layers(model)[0]
    ls = ib.conversion_result(q).scales[name]
    experts = q.get_submodule(name)
    for m, matrix in enumerate(MATRICES):
        w = getattr(experts, matrix)
        assert isinstance(w, ib.Float8StaticTensor) and w.qdata.dtype == torch.float8_e4m3fn
        assert torch.equal(w.act_scale, inc_activation_scale(ls.expert_input_scales[m]))
        assert torch.equal(w.scale, ls.expert_weight_scales[m].float())
        expert = w[1]  # one expert: a Float8StaticTensor with that expert's scales
        assert torch.equal(expert.act_scale, w.act_scale[1]) and torch.equal(expert.qdata.view(torch.uint8), w.qdata[1].view(torch.uint8))


def test_expert_without_calibration_tokens_falls_back_and_is_reported():
    model = _model("mixtral")  # 4 experts, top-2: one token reaches two experts per layer
    one_token = [{"input_ids": torch.tensor([[5]])}]
    meas = ib.calibrate(model, one_token)
    scales = ib.compute_scales(meas, model=model)
    q = ib.convert(model, scales)
    summary = ib.conversion_result(q).summary()
    for name in _experts_layers(model):
        stats, ls = meas[name], scales[name]
        idle = [e for e, t in enumerate(stats.expert_tokens) if t == 0]
        assert len(idle) == 2 and ls.fallback == tuple(idle)
        for m in range(len(MATRICES)):
            busy = max(stats.expert_input_amax[m])
            want = torch.tensor(busy, dtype=torch.float32) / (448.0 * ACTIVATION_BACKOFF)
            assert all(torch.equal(ls.expert_input_scales[m][e], want) for e in idle)
        for e in idle:
            assert f"note {name}[expert {e}]: no calibration tokens" in summary
    with torch.no_grad():
        assert torch.isfinite(q(torch.tensor([[1, 2, 3]])).logits).all()


def test_an_experts_layer_that_never_ran_is_named():
    model = _model("mixtral")
    meas = ib.calibrate(model, _batches(1))
    name = _experts_layers(model)[0]
    stats = dataclasses.replace(meas[name], expert_tokens=(0,) * 4)
    meas.layers[name] = stats
    with pytest.raises(ib.CalibrationError, match=f"{name}.*no expert received a calibration token"):
        ib.compute_scales(meas, model=model)


def test_expert_statistics_survive_a_measurements_file(tmp_path):
    model = _model("olmoe")
    meas = ib.calibrate(model, _batches(1))
    again = ib.Measurements.load(meas.save(tmp_path / "meas.json"))
    name = _experts_layers(model)[0]
    assert again[name].expert_tokens == meas[name].expert_tokens
    assert again[name].expert_input_amax == meas[name].expert_input_amax


class _Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = transformers.pytorch_utils.Conv1D(24, 16)  # nf=24 out, nx=16 in: weight [16, 24]

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_matches_inc_on_the_equivalent_linear(dtype):
    """INC 3.10 does not patch Conv1D; the same math as an nn.Linear (weight = W.T) it does."""
    torch.manual_seed(0)
    net = _Conv1DNet().to(dtype).eval()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 16, generator=g) * 3).to(dtype) for _ in range(3)]
    linear = nn.Sequential(nn.Linear(16, 24)).to(dtype).eval()  # INC patches children, not a bare root
    with torch.no_grad():
        linear[0].weight.copy_(net.fc.weight.t())
        linear[0].bias.copy_(net.fc.bias)
    inc = inc_reference(linear, batches, dtype, "maxabs_arbitrary")
    for form in ("subclass", "module"):
        q = ib.quantize(net, batches, form=form, backend="emulated")
        with torch.no_grad():
            assert torch.equal(q(batches[0]), inc(batches[0]))


def test_conv1d_per_channel_scales_are_per_output_feature():
    torch.manual_seed(0)
    net = _Conv1DNet().eval()
    batches = [torch.randn(4, 16) for _ in range(2)]
    recipe = ib.Recipe.model_validate({"quantization": {"weight": {"granularity": "per_channel"}}})
    qsub, qmod = (ib.quantize(net, batches, recipe, form=f) for f in ("subclass", "module"))
    w = qsub.fc.weight
    assert tuple(w.shape) == (16, 24) and tuple(w.scale.shape) == (1, 24)
    want = net.fc.weight.abs().amax(dim=0) / (448.0 * 0.5)  # one per output feature (a column of [in, out])
    assert torch.equal(w.scale.reshape(-1), want)
    assert torch.equal(qmod.fc.weight_scale, w.scale) and torch.equal(qmod.fc.qweight.view(torch.uint8), w.qdata.view(torch.uint8))
    with torch.no_grad():
        assert torch.equal(qsub(batches[0]), qmod(batches[0]))


class _ListMoE(nn.Module):
    """Experts as an nn.ModuleList of Linear MLPs (older transformers MoE models), top-1 routing."""

    def __init__(self, experts: int = 3, hidden: int = 16, inner: int = 24):
        super().__init__()
        self.gate = nn.Linear(hidden, experts)
        self.experts = nn.ModuleList(
            nn.ModuleDict({"w1": nn.Linear(hidden, inner), "w2": nn.Linear(inner, hidden)}) for _ in range(experts))

    def forward(self, x):
        choice = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = choice == e
            if rows.any():
                out[rows] = expert["w2"](torch.relu(expert["w1"](x[rows])))
        return out


def test_modulelist_expert_linear_without_tokens_takes_its_siblings_scales():
    torch.manual_seed(0)
    model = _ListMoE().eval()
    with torch.no_grad():  # the router sends every token to expert 0 or 1, never to expert 2
        model.gate.bias.copy_(torch.tensor([0.0, 0.0, -1e4]))
    batches = [torch.randn(8, 16) * 2 for _ in range(3)]
    meas = ib.calibrate(model, batches)
    assert "experts.2.w1" not in meas and {"experts.0.w1", "experts.1.w1"} <= set(meas.names)
    qsub, qmod = (ib.quantize(model, batches, form=f) for f in ("subclass", "module"))
    scales = ib.conversion_result(qsub).scales
    for linear in ("w1", "w2"):
        amax = max(meas[f"experts.{e}.{linear}"].input_amax[0] for e in (0, 1))
        want = torch.tensor(amax, dtype=torch.float32) / (448.0 * ACTIVATION_BACKOFF)
        assert torch.equal(scales[f"experts.2.{linear}"].input_scale, want)
        assert f"note experts.2.{linear}: no calibration tokens" in ib.conversion_result(qsub).summary()
    with torch.no_grad():
        x = torch.randn(5, 16)
        assert torch.equal(qsub(x), qmod(x))


def test_each_fp8_expert_matches_inc_on_that_expert_as_a_linear():
    """INC 3.10 does not see fused experts; each expert's matrix is a Linear INC does quantize. INC,
    calibrated on the rows routed to that expert, gives bit for bit what the FP8 expert gives."""
    model = _model("mixtral")
    model.set_experts_implementation("eager")
    batches = _batches()
    name = _experts_layers(model)[0]
    experts = model.get_submodule(name)
    calls = []
    hook = experts.register_forward_pre_hook(lambda m, args: calls.append((args[0], args[1])))
    with torch.no_grad():
        for b in batches:
            model(**b)
    hook.remove()
    q = ib.quantize(model, batches, backend="emulated").get_submodule(name)
    for e in (0, 1):
        rows = [h[torch.where((idx == e).T)[1]] for h, idx in calls]
        with torch.no_grad():  # per call, as the eager loop computes them
            halves = [F.linear(r, experts.gate_up_proj[e]).chunk(2, dim=-1) for r in rows]
            inter = [experts.act_fn(g) * u for g, u in halves]
        for matrix, inputs in (("gate_up_proj", rows), ("down_proj", inter)):
            w = getattr(experts, matrix)[e]
            linear = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False)).eval()
            with torch.no_grad():
                linear[0].weight.copy_(w)
            inc = inc_reference(linear, inputs, torch.float32, "maxabs_arbitrary")
            with torch.no_grad():
                assert torch.equal(F.linear(inputs[0], getattr(q, matrix)[e]), inc(inputs[0]))
