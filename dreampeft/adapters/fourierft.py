"""FourierFT (Gao et al., ICML 2024); docs/METHODS.md §3.

ΔW = scaling · Re(ifft2(F)) where F is zero except ``F[rows_l, cols_l] = spectrum_l`` at n fixed
random entries (PEFT's convention: ``randperm(d_out·d_in, seed)[:n]``, row-major).

Fast path. Re(ifft2(F)) of a real F equals ifft2 of its Hermitian part (F + F_mirror)/2, where
F_mirror[p, q] = F[-p, -q]; a Hermitian spectrum is fully described by its left half, so ΔW is one
``irfft2`` of a (d_out, d_in/2+1) array into which each coefficient is scattered (halved) at its
own position and at its mirror, whichever lie in the half. The adjoint is as simple:
dL/dc_l = scaling/(d_out·d_in) · Re(fft2(G))[rows_l, cols_l], and for real G the half spectrum
from ``rfft2(G)`` holds every needed value (the mirror entry has the same real part). Both
directions avoid complex scatter/gather through autograd (3-4x faster on this CPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, register_method
from .config import AdapterConfig, option, require


@dataclass
class FourierFTConfig(AdapterConfig):
    method = "fourierft"

    n_frequency: int = option(1000, "number of learnable spectral coefficients per layer",
                              cli="--n_frequency")
    scaling: float = option(150.0, "ΔW multiplier (torch's ifft2 divides by d_out·d_in); "
                            "literature: 150 GLUE, 300 LLaMA/ViT", cli="--fourier_scaling")
    seed: int = option(2024, "seed of the random frequency entries (shared by same-shape layers)",
                       cli="--fourier_seed")
    init: Literal["gaussian", "zeros"] = option(
        "gaussian", "spectrum init: standard normal (paper, PEFT) or zeros (identity start)",
        cli="--fourier_init")

    def validate(self) -> None:
        require(self.n_frequency >= 1, f"n_frequency must be >= 1 (got {self.n_frequency})")
        require(self.scaling != 0, "scaling must be non-zero; the paper uses 150-300")


@functools.lru_cache(maxsize=64)
def frequency_entries(d_out: int, d_in: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) int64 rows and cols; one draw per (shape, n, seed), as PEFT does."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(d_out * d_in, generator=g)[:n]
    return torch.stack([idx // d_in, idx % d_in])


def half_spectrum_maps(indices: torch.Tensor, d_out: int, d_in: int):
    """Flat positions in the (d_out, d_in//2+1) half spectrum for the scatter and the gather."""
    rows, cols = indices
    h = d_in // 2 + 1
    mrows, mcols = (-rows) % d_out, (-cols) % d_in
    own, mirror = cols < h, mcols < h
    scatter_pos = torch.cat([(rows * h + cols)[own], (mrows * h + mcols)[mirror]])
    scatter_src = torch.cat([own.nonzero().flatten(), mirror.nonzero().flatten()])
    gather_pos = torch.where(own, rows * h + cols, mrows * h + mcols)
    return scatter_pos, scatter_src, gather_pos


def spectrum_to_delta(spectrum, scatter_pos, scatter_src, shape, scaling) -> torch.Tensor:
    """ΔW (float32) from the spectrum: one irfft2 of the Hermitian half spectrum (module docstring)."""
    d_out, d_in = shape
    h = d_in // 2 + 1
    half = torch.zeros(d_out * h, dtype=torch.float32, device=spectrum.device)
    half.index_add_(0, scatter_pos, spectrum.float()[scatter_src] * 0.5)
    half = torch.complex(half, torch.zeros_like(half)).view(d_out, h)
    return torch.fft.irfft2(half, s=(d_out, d_in)) * scaling


class _SpectrumToDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spectrum, scatter_pos, scatter_src, gather_pos, shape, scaling):
        ctx.save_for_backward(gather_pos)
        ctx.scaling = scaling
        return spectrum_to_delta(spectrum, scatter_pos, scatter_src, shape, scaling)

    @staticmethod
    def backward(ctx, grad):
        (gather_pos,) = ctx.saved_tensors
        d_out, d_in = grad.shape
        # reshape, not view: the weight gradient often arrives transposed (seen on CUDA)
        real = torch.fft.rfft2(grad.float()).real.reshape(-1)
        return real[gather_pos] * (ctx.scaling / (d_out * d_in)), None, None, None, None, None


def activation_maps(indices: torch.Tensor, d_out: int, d_in: int):
    """For each entry (p, q): its bins in the rfft of an output (p') and an input (q') vector, the
    signs σ_p, σ_q that turn those bins into X̃ (σ = -1 in the stored half, +1 past it), and the
    entries themselves (rows p, cols q)."""
    rows, cols = indices
    own_p, own_q = rows <= d_out // 2, cols <= d_in // 2
    p_bin, q_bin = torch.where(own_p, rows, d_out - rows), torch.where(own_q, cols, d_in - cols)
    return p_bin, q_bin, torch.where(own_p, -1.0, 1.0), torch.where(own_q, -1.0, 1.0), rows, cols


def twiddled(x: torch.Tensor, bins: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """(T, n) complex X̃[:, k] = Σ_c x[:, c] e^{+2πi q_k c/d}: conj(R[q]) for q ≤ d/2, R[d - q] past
    it, R = rfft(x) (x real)."""
    r = torch.fft.rfft(x.float(), dim=-1)[:, bins]
    return torch.complex(r.real, r.imag * sign)


def sparse_apply(x: torch.Tensor, spectrum: torch.Tensor, src, sign, dst, d_dst: int, coef: float) -> torch.Tensor:
    """x ΔWᵀ (or, with the roles of p and q swapped, g ΔW) without forming ΔW: with X̃ as above,
    (x ΔWᵀ)[r] = scaling/d_in · Re(ifft(Z))[r], Z[p] = Σ_{k: p_k = p} c_k X̃[q_k]. T·(d log d + n) work."""
    z = torch.zeros(x.shape[0], d_dst, dtype=torch.complex64, device=x.device)
    z.index_add_(1, dst, twiddled(x, src, sign) * spectrum.float())
    return torch.fft.ifft(z, dim=-1).real * coef


def spectrum_grad(x: torch.Tensor, g: torch.Tensor, maps, coef: float) -> torch.Tensor:
    """dL/dc_k = coef · Σ_t Re(G̃_t[p_k] · X̃_t[q_k]) (``twiddled``): the gradient of y = x ΔWᵀ with
    respect to the spectrum from rffts of the T activations and output gradients (T·d·log d work)
    instead of the dense weight gradient gᵀx (T·d_out·d_in work)."""
    p_bin, q_bin, sp, sq = maps[:4]
    # Re(G̃·X̃) = Re·Re − σ_p σ_q Im·Im on real views: the complex product of two ``twiddled``
    # (T, n) arrays measured 1.1–1.8x slower here (an extra T×n complex temporary)
    rg = torch.view_as_real(torch.fft.rfft(g.float(), dim=-1)[:, p_bin])
    rx = torch.view_as_real(torch.fft.rfft(x.float(), dim=-1)[:, q_bin])
    re, im = (rg[..., 0] * rx[..., 0]).sum(0), (rg[..., 1] * rx[..., 1]).sum(0)
    return (re - sp * sq * im) * coef


# The spectrum gradient from activation rffts costs ~8 ns per (token, coefficient) on this CPU
# (gathers), the dense weight gradient ~0.015 ns per (token, weight) (a matmul): the rffts win
# when the layer has more than ~535 weights per coefficient. Measured, T = 77…4096: 640² with
# n = 1000, dense 25 ms vs rffts 38 ms (4096 tokens); 1280², 24 vs 12 ms; 640×2048, 2.0 vs 0.6 ms.
FFT_GRAD_AREA = 512
# Few tokens: ΔW is never formed at all (``sparse_apply`` both ways) when tokens·n·SPARSE_COST is
# below d_out·d_in. Measured fwd+bwd, n = 1000, sparse vs fused ms: 1280² at 64 tokens 10.4 vs
# 16.3, at 256 33.1 vs 28.2; 640² at 64 6.7 vs 8.2, at 256 15.3 vs 11.3; 2048→640 at 64 10.7 vs
# 13.4, at 256 24.3 vs 22.4: the crossover lies near tokens·n = d_out·d_in / 8.
SPARSE_COST = 8.0


class _FourierLinear(torch.autograd.Function):
    """base(x) + scale·x ΔWᵀ with the frozen W0 given no gradient, in one of two forms:

    * many tokens: one matmul with W0 + scale·ΔW (as in inference); the spectrum's gradient from
      ``spectrum_grad`` on layers with ≥ FFT_GRAD_AREA weights per coefficient, which never forms
      the dense weight gradient (a d_out×d_in matmul per layer per step), else from that dense
      gradient's rfft2 as in ``_SpectrumToDelta``;
    * few tokens (SPARSE_COST): W0 alone in the matmul and ``sparse_apply`` for the update, in
      forward and for the input gradient, so no dense ΔW is built at all.

    Autocast is honoured by hand (matmuls in its dtype, as F.linear under autocast would)."""

    @staticmethod
    def forward(ctx, x, spectrum, weight, bias, layer, dtype):
        d_out, d_in, n = layer.out_features, layer.in_features, spectrum.numel()
        ctx.scale, ctx.scaling, ctx.shape = layer.scale, layer.config.scaling, (d_out, d_in)
        ctx.sparse = (x.numel() // d_in) * n * SPARSE_COST < d_out * d_in
        ctx.fft = ctx.sparse or d_out * d_in >= FFT_GRAD_AREA * n
        ctx.maps = layer.activation_maps() if ctx.fft else layer.maps()[2]
        b = None if bias is None else bias.to(dtype)
        if ctx.sparse:
            _, q_bin, _, sq, rows, _ = ctx.maps
            delta = sparse_apply(x.reshape(-1, d_in), spectrum, q_bin, sq, rows, d_out, ctx.scaling / d_in)
            w = weight.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x.to(dtype), w, b) + (ctx.scale * delta).reshape(*x.shape[:-1], d_out).to(dtype)
        else:
            dw = spectrum_to_delta(spectrum, *layer.maps()[:2], (d_out, d_in), ctx.scaling)
            w = (weight + (ctx.scale * dw).to(weight.dtype)).to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(x.to(dtype), w, b)
        ctx.save_for_backward(x, w, spectrum)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, spectrum = ctx.saved_tensors
        (d_out, d_in), coef = ctx.shape, ctx.scale * ctx.scaling / (ctx.shape[0] * ctx.shape[1])
        flat, x2d = grad.reshape(-1, d_out), x.reshape(-1, d_in)
        gx = gs = None
        if ctx.needs_input_grad[0]:
            gx = flat.to(w.dtype) @ w
            if ctx.sparse:
                p_bin, _, sp, _, _, cols = ctx.maps
                delta = sparse_apply(flat, spectrum, p_bin, sp, cols, d_in, ctx.scaling / d_out)
                gx = gx + (ctx.scale * delta).to(gx.dtype)
            gx = gx.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1] and ctx.fft:
            gs = spectrum_grad(x2d, flat, ctx.maps, coef)
        elif ctx.needs_input_grad[1]:
            gs = torch.fft.rfft2(flat.float().T @ x2d.float()).real.reshape(-1)[ctx.maps] * coef
        return gx, gs, None, None, None, None


@register_method
class FourierFTLayer(AdapterLayer):
    config_cls = FourierFTConfig
    default_lr = 1e-2  # the paper's range is 1e-2..3e-1: a spectrum coefficient moves all of ΔW
    peft_writer = "fourierft"

    def __init__(self, base_layer: nn.Linear, config: FourierFTConfig):
        super().__init__(base_layer, config)
        d_out, d_in, n = self.out_features, self.in_features, config.n_frequency
        require(n <= d_out * d_in, f"n_frequency={n} exceeds the {d_out}x{d_in} layer's "
                f"{d_out * d_in} entries; lower n_frequency or exclude this layer")
        self.spectrum = nn.Parameter(self.new_tensor(n))
        if config.init == "gaussian":
            nn.init.normal_(self.spectrum)
        else:
            nn.init.zeros_(self.spectrum)
        device = self.spectrum.device
        # own copy: loading writes into it in place, and layers must not alias each other
        self.register_buffer("indices", frequency_entries(d_out, d_in, n, config.seed).to(device, copy=True))
        self._maps, self._act_maps = None, None
        self._cache: tuple | None = None  # (key, spectrum, fused weight) for no-grad forwards

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._maps, self._act_maps, self._cache = None, None, None  # indices may have changed

    def maps(self):
        if self._maps is None or self._maps[0].device != self.indices.device:
            self._maps = half_spectrum_maps(self.indices, self.out_features, self.in_features)
        return self._maps

    def activation_maps(self):
        if self._act_maps is None or self._act_maps[0].device != self.indices.device:
            self._act_maps = activation_maps(self.indices, self.out_features, self.in_features)
        return self._act_maps

    def delta_weight(self) -> torch.Tensor:
        return _SpectrumToDelta.apply(self.spectrum, *self.maps(),
                                      (self.out_features, self.in_features), self.config.scaling)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight().to(x.dtype))

    def fused_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w + (self.scale * self.delta_weight()).to(w.dtype)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # ΔW is dense: one matmul with W0 + ΔW instead of two (docs/METHODS.md §3, Cost).
        base = self.base_layer
        if torch.is_grad_enabled() and self.spectrum.requires_grad:
            if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
                w = self.fused_weight()  # someone trains W0 too: the dense weight gradient is needed
            else:
                device = x.device.type
                dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else base.weight.dtype
                return _FourierLinear.apply(x, self.spectrum, base.weight, base.bias, self, dtype)
        else:
            # Keyed on the spectrum's values, not its version counter: fused optimizers (AdamW
            # fused=True, transformers' default) update parameters without bumping _version, and a
            # stale cache then served the pre-training weight. n values compare in microseconds.
            key = (self.base_layer.weight._version, self.base_layer.weight.data_ptr(), self.scale,
                   self.spectrum.device, self.base_layer.weight.dtype)
            if self._cache is None or self._cache[0] != key or not torch.equal(self._cache[1], self.spectrum):
                with torch.no_grad():
                    self._cache = (key, self.spectrum.detach().clone(), self.fused_weight())
            w = self._cache[2]
        return F.linear(x.to(w.dtype), w, self.base_layer.bias)
