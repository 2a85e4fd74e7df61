"""The models of the model matrix (tests/test_model_matrix.py): small configs, random weights, fixed seeds.

Hugging Face transformers models are built from tiny configs of the real classes. torchvision and
timm cannot be installed beside this project's torch build (PyPI's torchvision fails to import next
to torch 2.13+cpu), so the CNNs are small plain-torch re-implementations of the blocks that define
each family, written after torchvision's code: ResNet's basic block with BatchNorm and a strided
1x1 shortcut, MobileNet-v3's inverted residual with squeeze-excitation and hardswish, ConvNeXt's
depthwise 7x7 + channels-last LayerNorm + GELU MLP + layer scale, EfficientNet's MBConv with SiLU
and squeeze-excitation. They exercise the same layer types and glue ops, not the real networks.

Each ``Case`` builds its model and its inputs for a (batch, length) shape; "length" is the sequence
length of text models and the image side of the CNNs (ViT and Whisper's encoder need a fixed input
length, so only their batch and decoder length vary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention_models import BaddbmmAttention, BmmAttention, FunctionalAttention, MhaModel
from .models import LinearNet, ToyNet

VOCAB = 64
SHAPES = ((2, 8), (3, 11))  # (batch, length) of the two ONNX runs; the first is the example / eager input


@dataclass(frozen=True)
class Case:
    """One model of the matrix.

    Attributes:
        build: a float model in eval mode (seeded inside).
        inputs: ``inputs(batch, length, seed)`` -> a tensor, tuple or dict of keyword arguments.
        attention_ops: the recipe ops that also quantize its attention; None for a model without any.
        plain_ops: the recipe ops without attention.
        hf: a transformers model (its attention is captured through transformers' attention interface).
        decoder: a transformers causal LM (``generate()`` exists).
        onnx_float_attention_fails: torch.onnx cannot export this model's float attention (the error
            it raises); with attention captured and quantized, inc_bridge's own twin exports it.
    """

    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, int], Any]
    attention_ops: tuple[str, ...] | None
    plain_ops: tuple[str, ...] = ("linear", "conv2d")
    hf: bool = False
    decoder: bool = False
    onnx_float_attention_fails: str | None = None  # torch.onnx's own error on the float model's attention
    exclude: tuple[str, ...] = ()  # the recipe's quantization.exclude


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hf(config_cls: str, model_cls: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(attn_implementation="sdpa", **config)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(cfg).eval()
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # the matrix compares logits; generate() tests turn it back on
        return model

    return build


_TEXT = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "max_position_embeddings": 64}
_DECODER = {**_TEXT, "num_key_value_heads": 2}  # grouped-query attention


def _text(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(batch, length, seed)}


def _seq2seq(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(batch, length, seed), "decoder_input_ids": _ids(batch, length - 2, seed + 1)}


def _vit(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": _randn(batch, 3, 16, 16, seed=seed)}  # position embeddings fix the image size


def _whisper(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    # Whisper's encoder requires exactly 2 * max_source_positions frames; the decoder length varies.
    return {"input_features": _randn(batch, 8, 16, seed=seed), "decoder_input_ids": _ids(batch, length, seed + 1)}


# ---------------------------------------------------------------- CNN blocks (plain torch, see the module docstring)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def _randomize_bn(model: nn.Module) -> nn.Module:
    """BatchNorm statistics that are not the identity, as after training."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


class BasicBlock(nn.Module):
    """ResNet-18's block: conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN when strided), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3))
        self.down = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.down(x))


class ResNetish(nn.Module):
    """ResNet-18's layout, shrunk: stem conv + BN + ReLU + max-pool, two stages of basic blocks, pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class SqueezeExcite(nn.Module):
    """Pool → 1x1 conv → act → 1x1 conv → gate, as in MobileNet-v3 (ReLU / hardsigmoid) and EfficientNet (SiLU / sigmoid)."""

    def __init__(self, channels: int, squeeze: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """MobileNet-v3 / EfficientNet MBConv: expand 1x1, depthwise kxk, squeeze-excite, project 1x1 (+ residual)."""

    def __init__(self, cin: int, expand: int, cout: int, k: int, stride: int, act: type[nn.Module],
                 se_act: type[nn.Module], se_gate: type[nn.Module]) -> None:
        super().__init__()
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            *_conv_bn(cin, expand, 1), act(),
            *_conv_bn(expand, expand, k, stride, groups=expand), act(),
            SqueezeExcite(expand, max(expand // 4, 4), se_act, se_gate),
            *_conv_bn(expand, cout, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3ish(nn.Module):
    """MobileNet-v3: hardswish stem, inverted residuals with SE (ReLU / hardsigmoid), classifier Linear-hardswish-Linear."""

    def __init__(self) -> None:
        super().__init__()
        blocks = [InvertedResidual(8, 16, 8, 3, 1, nn.Hardswish, nn.ReLU, nn.Hardsigmoid),
                  InvertedResidual(8, 24, 16, 5, 2, nn.Hardswish, nn.ReLU, nn.Hardsigmoid)]
        self.features = nn.Sequential(*_conv_bn(3, 8, 3, 2), nn.Hardswish(), *blocks)
        self.classifier = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EfficientNetish(nn.Module):
    """EfficientNet: SiLU stem, MBConv blocks with SE (SiLU / sigmoid), 1x1 head conv, pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        blocks = [InvertedResidual(8, 32, 8, 3, 1, nn.SiLU, nn.SiLU, nn.Sigmoid),
                  InvertedResidual(8, 32, 16, 5, 2, nn.SiLU, nn.SiLU, nn.Sigmoid)]
        self.features = nn.Sequential(*_conv_bn(3, 8, 3, 2), nn.SiLU(), *blocks, *_conv_bn(16, 32, 1), nn.SiLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's downsampling norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 → channels-last LayerNorm → Linear 4x → GELU → Linear → layer scale, + residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """ConvNeXt: 4x4 stride-4 patchify stem + LayerNorm2d, blocks, LayerNorm2d + 2x2 stride-2 downsampling, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16, eps=1e-6))
        self.stage1 = ConvNeXtBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, stride=2))
        self.stage2 = ConvNeXtBlock(32)
        self.norm, self.head = nn.LayerNorm(32, eps=1e-6), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(y.mean((2, 3))))


def _cnn(cls: type[nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return _randomize_bn(cls()).eval()

    return build


def _image(batch: int, length: int, seed: int) -> torch.Tensor:
    side = 16 if length <= 8 else 24  # image side varies with the shape, like a sequence length
    return _randn(batch, 3, side, side, seed=seed)


# ---------------------------------------------------------------- plain PyTorch models


def _plain(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls().eval()

    return build


def _transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return _randn(batch, length, 32, seed=seed)


def _seq_first(batch: int, length: int, seed: int) -> torch.Tensor:
    return _randn(length, batch, 32, seed=seed)


def _toy_image(batch: int, length: int, seed: int) -> torch.Tensor:
    return _randn(batch, 4, length + 4, length + 4, seed=seed) * 2


CASES: dict[str, Case] = {
    # GPT-2: its blocks use transformers' Conv1D, quantized as `linear` (and the untied lm_head).
    "gpt2": Case(_hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                     n_positions=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False), _text,
                 ("linear", "sdpa"), hf=True, decoder=True),
    "llama_gqa": Case(_hf("LlamaConfig", "LlamaForCausalLM", **_DECODER), _text, ("linear", "sdpa"), hf=True,
                      decoder=True),
    "mistral": Case(_hf("MistralConfig", "MistralForCausalLM", **_DECODER), _text, ("linear", "sdpa"), hf=True,
                    decoder=True),
    "qwen3": Case(_hf("Qwen3Config", "Qwen3ForCausalLM", **_DECODER, head_dim=8), _text, ("linear", "sdpa"),
                  hf=True, decoder=True),
    # Qwen2-MoE: fused routed experts with per-expert FP8 weights and input scales (transformers'
    # default "grouped_mm" experts implementation), shared expert and attention Linears.
    "qwen2_moe": Case(_hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_DECODER, moe_intermediate_size=32,
                          shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
                      _text, ("linear", "sdpa"), hf=True, decoder=True),
    "bert": Case(_hf("BertConfig", "BertModel", **{**_TEXT, "max_position_embeddings": 64}), _text,
                 ("linear", "sdpa"), hf=True),
    "vit": Case(_hf("ViTConfig", "ViTModel", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, image_size=16, patch_size=4), _vit, ("linear", "conv2d", "sdpa"), hf=True),
    "t5": Case(_hf("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                   num_layers=1, num_decoder_layers=1, num_heads=4, decoder_start_token_id=0),
               _seq2seq, ("linear", "sdpa"), hf=True,
               # torch 2.13's exporter decomposes T5's float SDPA (position bias as the mask, scale 1)
               # into a layout its own view cannot take: the float model fails the same way.
               onnx_float_attention_fails="Cannot view a tensor with shape"),
    "whisper": Case(_hf("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=VOCAB, d_model=32,
                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=8,
                        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None),
                    _whisper, ("linear", "sdpa"), hf=True),
    "resnet18_block": Case(_cnn(ResNetish), _image, None),
    "mobilenet_v3_block": Case(_cnn(MobileNetV3ish), _image, None),
    "convnext_block": Case(_cnn(ConvNeXtish), _image, None),
    "efficientnet_block": Case(_cnn(EfficientNetish), _image, None),
    "transformer_encoder": Case(_plain(_transformer_encoder), _tokens, ("linear", "sdpa")),
    "toynet": Case(_plain(ToyNet), _toy_image, None),
    "linearnet": Case(_plain(LinearNet), _tokens, None),
    "sdpa_gqa": Case(_plain(lambda: FunctionalAttention(kv_heads=2)), _tokens, ("linear", "sdpa")),
    "bmm_attention": Case(_plain(BmmAttention), _tokens, ("linear", "bmm")),
    "baddbmm_attention": Case(_plain(lambda: BaddbmmAttention(max_len=16)), _tokens, ("linear", "bmm")),
    "multihead_attention": Case(_plain(MhaModel), _seq_first, ("linear", "sdpa")),
}
