"""The fast path: each transformer layer's element-wise work compiled with torch.compile.

`CompiledLayers` is a layer runner for `InfDiT.forward_blocks`: it runs one layer as the eager
`InfDiT._layer` does, but the parts before and after the UniBA attention are pure functions of
(activations, weights) compiled once for every layer:

- pre-attention: LayerNorm + adaLN modulation, the QKV projection, the query LayerNorm on q and k
  (official quirk 8.1-1), RoPE;
- post-attention: the output projection and residual, in layer 0 the LR cross-attention and the
  affine LayerNorm in front of its MLP (8.1-6), the modulated MLP and residual.

The weights are arguments, never constants of a graph, so all layers share one graph per part
(layer 0's post-attention part is its own, having the cross-attention); the block dimension is
dynamic, so a sweep's smaller last call does not recompile (a one-block call is a graph of its
own: dynamo specialises on size 1). The attention itself (the neighbour gather of the K/V cache,
the slot offsets, SDPA) runs eagerly between the two parts, under the SDPA backend measured fastest
for its shape on the device (`FastestAttention`).

`resolve_fast` turns the user's `fast` option (auto/True/False) into a runner or None.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import modulate
from .rope import apply_rope

log = logging.getLogger("infdit")

# `fast="auto"` turns the fast path on for a CUDA job of at least this many block evaluations
# (network calls x blocks). Its basis: compiling the six graphs took about FIRST_COMPILE_S_CPU on
# the project's 2-core CPU machine (released width, fp32, empty inductor cache: 62 s, see
# docs/fast-path.md); a GPU compile is taken to cost about as much (inductor's compile is host
# work; unmeasured). The saving per block evaluation on a GPU is NOT measured; the 5 ms assumed
# here is the gap between the measured eager cost at many blocks per call (~10 ms per block on an
# H200) and the compiled target (<= 4.5 ms).
# With those, 60 s of compiling is repaid after 12,000 block evaluations: a 2048² output at 20
# steps (256 blocks x 39 calls ~ 10,000) stays eager, 4096² (1024 blocks) compiles.
FIRST_COMPILE_S_CPU = 60.0
ASSUMED_SAVING_S_PER_BLOCK = 0.005
AUTO_MIN_BLOCK_EVALUATIONS = round(FIRST_COMPILE_S_CPU / ASSUMED_SAVING_S_PER_BLOCK)

FAST_CHOICES = {"auto": "auto", "on": True, "off": False}

# The SDPA backends timed against each other for each attention shape, by device type: those whose
# memory grows with the tokens, not with their square (the planner counts no score matrix), so the
# math kernel is not among them. On CUDA: cuDNN attention (often about twice PyTorch's flash
# kernel on Hopper), flash, and memory-efficient attention (the one for fp32 and older cards); on
# the CPU, its flash kernel (the one SDPA runs there by default).
TIMED_BACKENDS = {"cuda": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
                  "cpu": [SDPBackend.FLASH_ATTENTION]}
TIMED_RUNS = 3  # timed calls of each backend (after one warm-up); the fastest counts


def parse_fast(value: Union[str, bool]) -> Union[str, bool]:
    """'auto'/'on'/'off' (CLI, node) or auto/True/False (API) -> 'auto', True or False."""
    if isinstance(value, bool) or value == "auto":
        return value
    if value in FAST_CHOICES:
        return FAST_CHOICES[value]
    raise ValueError(f"fast must be auto, on or off (True/False), got {value!r}")


# --- the compiled parts: pure functions of activations and weights ---------------------------------

def _mlp(x, w_in, b_in, w_out, b_out):
    return F.linear(F.gelu(F.linear(x, w_in, b_in), approximate="tanh"), w_out, b_out)


def pre_attention(h, mod, cos, sin, qkv_w, qkv_b, qn_w, qn_b, *, heads: int, eps: float):
    """q, k, v [M, H, T, d] of one layer from the residual stream h [M, T, D] and the layer's
    modulation mod [M, 4, D], as InfDiT._self_attention computes them."""
    M, T, D = h.shape
    d = D // heads
    shift, scale = mod[:, 0], mod[:, 1]
    x = modulate(F.layer_norm(h, (D,), eps=eps), shift, scale)
    q, k, v = F.linear(x, qkv_w, qkv_b).view(M, T, 3, heads, d).unbind(2)
    # Official quirk (8.1-1): the query LayerNorm normalises the keys too.
    q = apply_rope(F.layer_norm(q, (d,), qn_w, qn_b, eps), cos, sin).transpose(1, 2)
    k = apply_rope(F.layer_norm(k, (d,), qn_w, qn_b, eps), cos, sin).transpose(1, 2)
    return q, k, v.contiguous().transpose(1, 2)


def _attention_output(h, attn, dense_w, dense_b):
    M, H, T, d = attn.shape
    return h + F.linear(attn.transpose(1, 2).reshape(M, T, H * d), dense_w, dense_b)


def post_attention(h, attn, mod, dense_w, dense_b, w_in, b_in, w_out, b_out, *, eps: float):
    """The rest of a layer after layer 0: out projection + residual, modulated MLP + residual."""
    h = _attention_output(h, attn, dense_w, dense_b)
    x = modulate(F.layer_norm(h, h.shape[-1:], eps=eps), mod[:, 2], mod[:, 3])
    return h + _mlp(x, w_in, b_in, w_out, b_out)


def post_attention_first(h, attn, mod, lr_windows, lr_valid, dense_w, dense_b, proj_w, proj_b, ca_q_w, ca_q_b,
                         ca_kv_w, ca_kv_b, ca_dense_w, ca_dense_b, cq_w, cq_b, ck_w, ck_b, q_pos, k_pos, ln_w, ln_b,
                         w_in, b_in, w_out, b_out, *, heads: int, eps: float):
    """Layer 0 after its attention: the LR cross-attention (un-modulated LN in, no gate out) and an
    affine LN in front of the MLP, as InfDiT._layer, _lr_tokens and _lr_cross_attention compute
    them. The LR tokens are embedded here, so they are freed once projected (as in the eager path)."""
    h = _attention_output(h, attn, dense_w, dense_b)
    M, T, D = h.shape
    d = D // heads
    # Tokens outside the image are exact zeros (the official code zero-pads after the convolution).
    lr_tokens = F.conv2d(lr_windows.to(h.dtype), proj_w, proj_b, stride=2) * lr_valid[:, None].to(h.dtype)
    lr_tokens = lr_tokens.flatten(2).transpose(1, 2)
    q = F.linear(F.layer_norm(h, (D,), eps=eps), ca_q_w, ca_q_b).view(M, T, heads, d)
    q = F.layer_norm(q, (d,), cq_w, cq_b, eps) + q_pos[0]
    k, v = (F.linear(lr_tokens, ca_kv_w) + ca_kv_b).view(M, lr_tokens.shape[1], 2, heads, d).unbind(2)
    k = F.layer_norm(k, (d,), ck_w, ck_b, eps) + k_pos[0]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    h = h + F.linear(out.transpose(1, 2).reshape(M, T, D), ca_dense_w, ca_dense_b)
    x = modulate(F.layer_norm(h, (D,), ln_w, ln_b, eps), mod[:, 2], mod[:, 3])
    return h + _mlp(x, w_in, b_in, w_out, b_out)


# One compiled function per part for the whole process: dynamo caches the graphs on the function's
# code, keyed (guarded) on shapes, dtypes and devices, so every model and every call reuses them.
_COMPILED = {fn.__name__: torch.compile(fn, fullgraph=True)
             for fn in (pre_attention, post_attention, post_attention_first)}
_first_call_s: dict[tuple, float] = {}  # (part, device, dtype, shapes) -> seconds of its first call


def compile_times() -> dict[tuple, float]:
    """Seconds each graph's first call took in this process (compiling it), by part and shapes."""
    return dict(_first_call_s)


# Per part, how many of its leading arguments are per-block tensors (the rest are weights).
_PER_BLOCK = {"pre_attention": 4, "post_attention": 3, "post_attention_first": 5}


def _run(part: str, *args, **constants):
    h = args[0]
    # The block dimension of every per-block input is dynamic (one graph for any block count >= 2).
    key = (part, h.device.type, h.dtype, tuple(h.shape[1:]), h.shape[0] == 1)
    if h.shape[0] > 1:
        for t in args[:_PER_BLOCK[part]]:
            torch._dynamo.mark_dynamic(t, 0)
    if key in _first_call_s:
        return _COMPILED[part](*args, **constants)
    start = time.perf_counter()
    out = _COMPILED[part](*args, **constants)
    if h.is_cuda:
        torch.cuda.synchronize(h.device)  # once per graph: the compile time, not the queue
    _first_call_s[key] = seconds = time.perf_counter() - start
    log.info("Inf-DiT fast path: compiled %s for %s blocks of %s (%s, %s) in %.1f s (once per process)",
             part, "1" if key[4] else "any number of", "x".join(map(str, key[3])), key[2], key[1], seconds)
    return out


# --- attention backend --------------------------------------------------------------------------

def _time_call(run, device: torch.device) -> float:
    """Seconds of the fastest of TIMED_RUNS calls of run() on `device`."""
    best = float("inf")
    for _ in range(TIMED_RUNS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


class FastestAttention:
    """SDPA under the fastest backend measured for each shape: the first call with a new (device,
    dtype, q shape, key shape) times every backend of `candidates` for the device that accepts the
    inputs, on those inputs, and later calls of that shape run the winner alone. Timing a backend
    costs 1 + TIMED_RUNS attention calls, once per shape and process. `timer(backend, run, device)`
    returns seconds (tests give their own). Where no candidate applies, SDPA chooses by itself."""

    def __init__(self, candidates: Optional[dict] = None, timer=None):
        self.candidates = TIMED_BACKENDS if candidates is None else candidates
        self.timer = timer or (lambda backend, run, device: _time_call(run, device))
        self.chosen: dict[tuple, Optional[SDPBackend]] = {}
        self.timings: dict[tuple, dict[str, float]] = {}  # key -> {backend name: seconds}, for reports

    @staticmethod
    def _key(q, k):
        return q.device.type, q.device.index, q.dtype, tuple(q.shape), tuple(k.shape)

    def __call__(self, q, k, v):
        backend = self.choice(q, k, v)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    def choice(self, q, k, v) -> Optional[SDPBackend]:
        key = self._key(q, k)
        if key not in self.chosen:
            self.chosen[key] = self._measure(key, q, k, v)
        return self.chosen[key]

    def _measure(self, key, q, k, v) -> Optional[SDPBackend]:
        seconds = {}
        for backend in self.candidates.get(q.device.type, []):
            def run(backend=backend):
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v)
            try:
                with warnings.catch_warnings():  # SDPA warns why a backend refuses, then raises
                    warnings.simplefilter("ignore")
                    run()  # warm-up, and the test that this backend takes these inputs
            except torch.OutOfMemoryError:
                raise  # not a refusal: the caller's out-of-memory back-off handles it
            except RuntimeError:
                continue
            seconds[backend] = self.timer(backend, run, q.device)
        self.timings[key] = {b.name.lower(): t for b, t in seconds.items()}
        if not seconds:
            return None
        best = min(seconds, key=seconds.get)
        if len(seconds) > 1:
            measured = ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in self.timings[key].items())
            log.info("Inf-DiT fast path: attention q %s k %s (%s, %s): %s -> %s", list(q.shape), list(k.shape),
                     q.dtype, q.device.type, measured, best.name.lower())
        return best


ATTENTION = FastestAttention()


def attention_backend_used(q, k, v) -> str:
    """Name of the backend the fast path runs for these inputs (measuring it if this shape is new),
    or "sdpa default". For reports (benchmarks), not for the sweep."""
    backend = ATTENTION.choice(q, k, v)
    return "sdpa default" if backend is None else backend.name.lower()


# --- the runner ---------------------------------------------------------------------------------

class CompiledLayers:
    """Layer runner for InfDiT.forward_blocks: `runner(model, index, h, mods, cos, sin, neighbours,
    inputs)` is one layer, the compiled parts around the eager attention."""

    def __call__(self, model, index, h, mods, cos, sin, neighbours, inputs):
        cfg = model.config
        layer, adaln = model.transformer.layers[index], model.mixins.adaln_layer
        # One layout for every layer, so no graph is recompiled for another stride or offset: each
        # layer's modulation is a slice of all of them (h is contiguous already).
        h, mod = h.contiguous(), mods[:, index].contiguous()
        qkv, q_norm = layer.attention.query_key_value, adaln.q_layer_norm[index]
        qkv_parts = [*_run("pre_attention", h, mod, cos, sin, qkv.weight, qkv.bias, q_norm.weight, q_norm.bias,
                           heads=cfg.num_heads, eps=cfg.eps)]
        attn = self._attention(model, index, qkv_parts, neighbours)
        mlp = layer.mlp
        weights = (layer.attention.dense.weight, layer.attention.dense.bias)
        mlp_weights = (mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias, mlp.dense_4h_to_h.weight,
                       mlp.dense_4h_to_h.bias)
        if index:
            return _run("post_attention", h, attn, mod, *weights, *mlp_weights, eps=cfg.eps)
        ca, ln = adaln.cross_attention, adaln.post_cross_attention_layernorm
        return _run("post_attention_first", h, attn, mod, inputs.lr_windows, inputs.lr_valid, *weights,
                    adaln.proj_lr.weight, adaln.proj_lr.bias, ca.query.weight, ca.query.bias, ca.key_value.weight, ca.key_value.bias, ca.dense.weight,
                    ca.dense.bias, adaln.cross_q_ln.weight, adaln.cross_q_ln.bias, adaln.cross_k_ln.weight,
                    adaln.cross_k_ln.bias, adaln.lr_query_position_embedding, adaln.lr_key_position_embedding,
                    ln.weight, ln.bias, *mlp_weights, heads=cfg.num_heads, eps=cfg.eps)

    @staticmethod
    def _attention(model, index, qkv_parts, neighbours):
        """The UniBA attention, eager, as InfDiT._self_attention runs it: the neighbour gather, the
        slot offsets, SDPA. qkv_parts [q, k, v] is emptied, so the call's own K/V live on only in the
        cache (the memory the planner counts)."""
        v, k, q = qkv_parts.pop(), qkv_parts.pop(), qkv_parts.pop()
        keys, values = neighbours.gather(index, k, v)
        del k, v
        keys += model.mixins.adaln_layer.re_pos_embed[index].transpose(0, 1)[None, :, :, None, :]
        return ATTENTION(q, keys.flatten(2, 3), values.flatten(2, 3))


COMPILED_LAYERS = CompiledLayers()


def resolve_fast(fast: Union[str, bool], device: torch.device, block_evaluations: int) -> Optional[CompiledLayers]:
    """The layer runner for a job, or None for the eager path. auto: on CUDA for a job of at least
    AUTO_MIN_BLOCK_EVALUATIONS block evaluations, never on CPU (where compiling costs more than a
    small job and the CPU sweep is bound by its matrix products anyway)."""
    fast = parse_fast(fast)
    if fast == "auto":
        fast = torch.device(device).type == "cuda" and block_evaluations >= AUTO_MIN_BLOCK_EVALUATIONS
        if fast:
            log.info("Inf-DiT: fast path on (auto: %d block evaluations >= %d)", block_evaluations,
                     AUTO_MIN_BLOCK_EVALUATIONS)
    return COMPILED_LAYERS if fast else None
