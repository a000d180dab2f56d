"""RWKV-7 ("Goose") for a batch of sequences: the math alone, in plain PyTorch.

The math is the ``rwkv`` package's ``RWKV_x070`` (same ``.pth`` keys, same folding of ``ln0`` into
the embedding, same transposes), written for batches: a decode step is a batch of one token per
sequence, a prompt chunk a batch of equally long runs. The state update
``S*w + (S @ -kk) outer (kk*a) + v outer k`` is computed as what it is, a decay and a rank-two
update, not as a matrix product with a rank-one matrix. Where the states live (slots on the
device, in place or gathered) is the runner's business: :meth:`RWKV7.forward` reads and writes
them through :class:`engine.models.base.LayerStates`.

State of one sequence, per layer (the snapshot layout, which is the package's):
    0 att_x_prev [C]        model dtype  time-mix token shift: the last input of the layer
    1 att_kv     [H, N, N]  float32      wkv state S; the package keeps it [value, key], the
                                         slots keep it [key, value] (fla-core's layout)
    2 ffn_x_prev [C]        model dtype  channel-mix token shift
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from engine import native
from engine.cpu_features import this_cpu
from engine.errors import EngineError
from engine.heap import release_free_heap
from engine.kernels import Linear, Recurrence, int8_report, load_fla
from engine.models.base import BatchedModel, LayerStates, StateTensor

log = logging.getLogger(__name__)

DECAY_SCALE = -0.606531  # -exp(-0.5): the log decay is DECAY_SCALE * sigmoid(w0 + lora(x))
# The relative error (of the largest value of each output) beyond which the C step's self-check
# refuses it; it computes what PyTorch does on the same weights, so only the summation order
# differs (measured: under 1e-6 on random models)
NATIVE_SELF_CHECK = 1e-4
# The same where the products' inputs are rounded (to 8 bits with AVX-512 VNNI, to bf16 with
# AVX-512 BF16): PyTorch rounds them as the C step does, but an input a rounding apart upstream can
# land on the other side of a step (measured on 8-bit inputs: a relative change of 1e-7 in a
# prompt's input moves a later step's output by 3e-3 on PyTorch alone; the C step against PyTorch
# 7e-3 to 1.1e-2 on random models of width 256 to 1088); a wrong product is off by its whole size
NATIVE_SELF_CHECK_ROUNDED = 5e-2


# The block's six large matrices: attribute, and key in the file under "blocks.N."
_LINEARS = {
    "receptance": "att.receptance.weight",
    "key": "att.key.weight",
    "value": "att.value.weight",
    "output": "att.output.weight",
    "ffn_key": "ffn.key.weight",
    "ffn_value": "ffn.value.weight",
}


class _Layer:
    """The weights of one block, in the shapes the step uses."""

    receptance: Linear
    key: Linear
    value: Linear
    output: Linear
    ffn_key: Linear
    ffn_value: Linear

    def __init__(self, get: Callable[[str], torch.Tensor], lin: Callable[[str], Linear], i: int) -> None:
        att, ffn, blk = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blocks.{i}."
        self.ln1_w, self.ln1_b = get(blk + "ln1.weight"), get(blk + "ln1.bias")
        self.ln2_w, self.ln2_b = get(blk + "ln2.weight"), get(blk + "ln2.bias")
        # the six token-shift mixes x_r, x_w, x_k, x_v, x_a, x_g as one [6, 1, C] tensor
        self.mix = torch.stack([get(att + f"x_{n}") for n in "rwkvag"]).unsqueeze(1)
        self.w0, self.w1, self.w2 = get(att + "w0"), get(att + "w1"), get(att + "w2")
        self.a0, self.a1, self.a2 = get(att + "a0"), get(att + "a1"), get(att + "a2")
        self.g1, self.g2 = get(att + "g1"), get(att + "g2")
        # The first layer's value is the "v_first" that later layers mix in; it has no v0/v1/v2.
        self.has_v_mix = i > 0
        if self.has_v_mix:
            self.v0, self.v1, self.v2 = get(att + "v0"), get(att + "v1"), get(att + "v2")
        self.k_k, self.k_a, self.r_k = get(att + "k_k"), get(att + "k_a"), get(att + "r_k").flatten()
        self.ln_x_w, self.ln_x_b = get(att + "ln_x.weight"), get(att + "ln_x.bias")
        self.ffn_x_k = get(ffn + "x_k")
        self.load_linears(lin, i)

    def load_linears(self, lin: Callable[[str], Linear], i: int) -> None:
        """The six large matrices of block ``i``, made by ``lin`` from their keys."""
        for name, key in _LINEARS.items():
            setattr(self, name, lin(f"blocks.{i}.{key}"))

    def linears(self) -> list[Linear]:
        """The block's six large matrices."""
        return [getattr(self, name) for name in _LINEARS]

    def native(self) -> tuple[native.LayerStruct, list[torch.Tensor]]:
        """The C step's view of this block (:mod:`engine.native`), and the tensors it points into
        that nothing else holds (the LoRA matrices transposed to [out, in])."""
        keep: list[torch.Tensor] = []

        def lora(t: torch.Tensor) -> native.Mat:  # [in, out] in the file
            m, packed = native.mat_of(t.t())
            keep.append(packed)
            return m

        s = native.LayerStruct()
        for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b", "mix", "w0", "a0", "k_k", "k_a", "r_k"):
            setattr(s, name, native.ptr(getattr(self, name)))
        s.ln_x_w, s.ln_x_b = native.ptr(self.ln_x_w), native.ptr(self.ln_x_b)
        s.ffn_x_k = native.ptr(self.ffn_x_k)
        for name, m in zip(_LINEARS, self.linears(), strict=True):
            setattr(s, name, m.native_mat())
        for name in ("w1", "w2", "a1", "a2", "g1", "g2"):
            setattr(s, name, lora(getattr(self, name)))
        if self.has_v_mix:
            s.v0 = native.ptr(self.v0)
            s.v1, s.v2 = lora(self.v1), lora(self.v2)
        return s, keep


class RWKV7(BatchedModel):
    """An RWKV-7 model's weights on one device, and its forward pass over a batch."""

    family = 7

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        batch_hint: int,
        use_fla: bool | None,
        int8: bool = False,
    ) -> None:
        if any(".s_emb" in k or ".s1" in k for k in weights):
            raise EngineError("DeepEmbed RWKV-7 checkpoints are not supported by the batched engine")
        # The C step (engine.native) on the CPU in float32, where it builds: the whole forward
        # pass, with int8 weights (one scale per row) under 'cpu int8', and under 'cpu bf16' where
        # it is built with AVX-512 BF16, bf16 weights whose products take bf16 inputs and sum in
        # float32, everything else in float32. Elsewhere PyTorch, with fbgemm's dynamic int8
        # products under 'cpu int8': the large products (the block's six, the head) in int8, the
        # small LoRA ones not; 8-bit inputs only where fbgemm runs its AVX-512 VNNI kernels (32-bit
        # sums); elsewhere its 16-bit sums of pairs saturate on them (engine.cpu_features)
        lib = native.load() if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else None
        use_native = lib is not None and lib.lib is not None and native_step_fits(weights)
        bf16 = use_native and dtype == torch.bfloat16
        if dtype == torch.bfloat16:
            use_native = bf16 = bf16 and lib is not None and lib.bf16
            if bf16:
                dtype = torch.float32  # the state and everything but the large weights
        self.device, self.dtype = device, dtype
        r_k = weights["blocks.0.att.r_k"]
        self.n_head, self.head_size = int(r_k.shape[0]), int(r_k.shape[1])
        self.vocab_size, self.n_embd = (int(d) for d in weights["emb.weight"].shape)
        self.n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))

        def get(key: str) -> torch.Tensor:
            source = weights[key]
            t = source.squeeze().to(device=device, dtype=dtype).contiguous()
            # a copy of its own: a view would keep the whole file mapped (engine.formats maps it)
            # and every page the loading read resident, as much again as the model
            return t.clone() if t.data_ptr() == source.data_ptr() else t

        reduce_range = not this_cpu().vnni if int8 else True  # fbgemm's inputs; the C step has none
        vnni = use_native and lib is not None and lib.vnni  # the C step's int8 on 8-bit inputs

        def lin(key: str, c_step: bool = use_native) -> Linear:
            return Linear(
                weights[key],
                device,
                dtype,
                batch_hint,
                int8=int8,
                reduce_range=reduce_range,
                native=c_step,
                vnni=vnni and c_step,
                bf16=bf16 and c_step,
            )

        with torch.no_grad():
            emb = weights["emb.weight"].to(device=device, dtype=dtype)
            self.emb = F.layer_norm(
                emb, (self.n_embd,), weight=get("blocks.0.ln0.weight"), bias=get("blocks.0.ln0.bias")
            ).contiguous()
            self.layers = []
            for i in range(self.n_layer):
                self.layers.append(_Layer(get, lin, i))
                release_free_heap()  # each layer's temporaries, before the next layer's (engine.heap)
            self.ln_out_w, self.ln_out_b = get("ln_out.weight"), get("ln_out.bias")
            self.head = lin("head.weight")
        self._fla: Recurrence | None = None  # the recurrence in use: None is the plain path
        self._fla_kernel: Recurrence | None = None  # the fused one installed, in use or not
        self._fla_in_place = False  # whether fla-core's kernel updates the slots in place
        self._native: native.Native | None = None
        self._native_layers: list[native.LayerStruct] = []
        self._native_head: native.Mat | None = None
        self._native_keep: list[torch.Tensor] = []
        self._work = torch.empty(0, dtype=torch.float32)
        self._native_ffn: list[int] = []  # each layer's channel-mix width
        self._native_row_floats = 0  # scratch floats per input row, for the widest layer
        if use_native and lib is not None:  # the PyTorch path's matrices, should the check fail
            self._install_native(lib, lambda key: lin(key, c_step=False))
        if int8:
            warning = self._int8_report()[1]
            if warning is not None:  # one line for the model, not one per matrix
                log.warning("%s", warning)

        if device.type == "cuda" and use_fla is not False:
            loaded = load_fla(
                device, self.n_head, self.head_size, plain=recurrent_plain, log_decay_scale=DECAY_SCALE
            )
            if loaded is not None:
                self.install_fused(*loaded)

    def _install_native(self, lib: native.Native, torch_lin: Callable[[str], Linear]) -> None:
        """Point the C step at the weights, then check it against PyTorch on the same weights;
        should it disagree, the PyTorch path takes over (with its own kernels) and a warning
        says so."""
        self._native = lib
        for p in self.layers:
            struct, keep = p.native()
            self._native_layers.append(struct)
            self._native_keep.extend(keep)
        self._native_head = self.head.native_mat()
        # each layer's channel-mix width, and the scratch space of its widest layer (linear in the
        # rows: rwkv7_workspace)
        assert lib.lib is not None
        self._native_ffn = [int(s.ffn_key.rows) for s in self._native_layers]
        self._native_row_floats = max(
            int(
                lib.lib.rwkv7_workspace(
                    1, self.n_embd, s.ffn_key.rows, s.w1.rows + s.a1.rows + s.g1.rows + s.v1.rows
                )
            )
            for s in self._native_layers
        )
        problem = self._native_self_check()
        if problem is None:
            return
        log.warning("the C step %s; PyTorch runs this model", problem)
        self._native, self._native_layers, self._native_head, self._native_keep = None, [], None, []
        self._native_ffn, self._native_row_floats = [], 0
        with torch.no_grad():  # from the file's weights (an int8 model's too: not its rounded ones)
            for i, p in enumerate(self.layers):
                p.load_linears(torch_lin, i)
            self.head = torch_lin("head.weight")

    def _native_self_check(self) -> str | None:
        """None when the C step's first layers and head agree with PyTorch's on random inputs
        (a batch of 2 prompt chunks of 3 tokens, a decode step of those 2, and one of a single
        sequence: each kind of tile the C step has), else what went wrong. The head is compared
        on its first 4096 rows (a whole float32 copy of a large head would cost gigabytes)."""
        gen = torch.Generator().manual_seed(11)
        C, H, N = self.n_embd, self.n_head, self.head_size
        layers = min(2, self.n_layer)
        rows = min(4096, self.vocab_size)
        f32 = torch.float32
        worst = 0.0
        try:
            starts = [
                [
                    torch.randn(2, C, generator=gen, dtype=f32),
                    torch.randn(2, H, N, N, generator=gen, dtype=f32) * 0.1,
                    torch.randn(2, C, generator=gen, dtype=f32),
                ]
                for _ in range(layers)
            ]
            both = []
            for run, head in ((self._forward_native, self.logits), (self._forward_torch, self._head_rows)):
                outs = []
                for batch, steps in ((2, (3, 1)), (1, (1,))):
                    states = _Scratch([[t[:batch].clone() for t in layer] for layer in starts])
                    for T in steps:
                        x = torch.randn(batch, T, C, generator=torch.Generator().manual_seed(T), dtype=f32)
                        outs.append(run(x, states, layers=layers))
                    outs.append(head(outs[-1])[:, :rows])
                    outs.extend(t for layer in states.layers for t in layer)
                both.append(outs)
            for got, want in zip(*both, strict=True):
                error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                worst = max(worst, error)
        except (ValueError, RuntimeError, OSError) as exc:
            return f"failed its self-check ({exc})"
        limit = NATIVE_SELF_CHECK if self.head.native_inputs == "float32" else NATIVE_SELF_CHECK_ROUNDED
        if not worst <= limit:
            return f"disagrees with PyTorch (relative error {worst:.2e}, limit {limit})"
        return None

    def _head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """The PyTorch path's logits for the first 4096 tokens of the C step's head."""
        h = F.layer_norm(hidden, (self.n_embd,), weight=self.ln_out_w, bias=self.ln_out_b)
        return F.linear(self.head.round_inputs(h), self.head.plain_weight(4096))

    def install_fused(self, recurrence: Recurrence, in_place: bool) -> None:
        """Run the recurrence with ``recurrence`` (fla-core's, or a test's stand-in on the CPU);
        ``in_place``: it updates the slots where they are."""
        self._fla_kernel = recurrence
        self._fla, self._fla_in_place = recurrence, in_place

    @property
    def fused_available(self) -> bool:
        """Whether a fused kernel is installed (in use or not)."""
        return self._fla_kernel is not None

    def set_fused(self, on: bool) -> None:
        """Use the installed fused kernel, or the plain recurrence."""
        self._fla = self._fla_kernel if on else None

    def state_layout(self) -> list[StateTensor]:
        """att_x_prev, att_kv, ffn_x_prev (see the module's docstring)."""
        C, H, N = self.n_embd, self.n_head, self.head_size
        return [
            StateTensor("att_x_prev", (C,), self.dtype),
            StateTensor("att_kv", (H, N, N), torch.float32, transposed=True),
            StateTensor("ffn_x_prev", (C,), self.dtype),
        ]

    @property
    def fused_recurrence(self) -> bool:
        """Whether fla-core's kernel runs the recurrence."""
        return self._fla is not None

    def kernels(self) -> list[str]:
        """The C step, oneDNN prepacking (CPU) and fla-core's kernel (CUDA), where in use."""
        parts = []
        if self._native is not None:
            parts.append(self._native.describe())
            if self.head.native_scale is not None:
                parts.append("int8 weights (one scale per row)")
                if self.head.native_inputs == "int8":
                    parts.append("8-bit inputs (one scale per 64 columns)")
            if self.head.native_inputs == "bf16":
                parts.append("bf16 weights and inputs of the products, float32 sums")
        int8 = self._int8_report()[0]
        if int8 is not None:
            parts.append(int8)
        if any(m.packed is not None for m in self._linears()):
            parts.append("oneDNN prepacked")
        if self._fla is not None:
            parts.append("fla fused recurrent" + (" in place" if self._fla_in_place else ""))
        return parts

    def _linears(self) -> list[Linear]:
        return [self.head, *(m for p in self.layers for m in p.linears())]

    def _int8_report(self) -> tuple[str | None, str | None]:
        """The int8 part of the kernels line and the load-time warning (:func:`int8_report`)."""
        return int8_report([m.int8_check for m in self._linears() if m.int8_check is not None])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The (ln0-normalised) embedding of token ids."""
        return F.embedding(tokens, self.emb)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """ln_out, then the head, in float32."""
        if self._native is None or self._native_head is None:
            return self._logits_torch(hidden)
        assert self._native.lib is not None
        h = hidden.float().contiguous()
        B = h.shape[0]
        out = torch.empty(B, self.vocab_size, dtype=torch.float32)
        work = self._workspace(int(self._native.lib.rwkv7_workspace(B, self.n_embd, 0, 0)))
        self._native.lib.rwkv7_head(
            ctypes.addressof(self._native_head),
            native.ptr(self.ln_out_w),
            native.ptr(self.ln_out_b),
            B,
            self.n_embd,
            native.ptr(h),
            native.ptr(out),
            native.ptr(work),
            torch.get_num_threads(),
        )
        return out

    def _logits_torch(self, hidden: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(hidden, (self.n_embd,), weight=self.ln_out_w, bias=self.ln_out_b)
        return self.head(h).float()

    def _workspace(self, floats: int) -> torch.Tensor:
        """Scratch space of the C step, kept between steps (grown, never shrunk)."""
        if self._work.numel() < floats:
            self._work = torch.empty(floats, dtype=torch.float32)
        return self._work[:floats]

    def forward(self, x: torch.Tensor, states: LayerStates, *, prompt: bool = False) -> torch.Tensor:
        """All layers on ``x`` [B, T, C]; returns the last position [B, C]. ``prompt``: a prompt
        chunk (the fused kernel packs those, whatever their length)."""
        if self._native is not None:
            return self._forward_native(x, states)
        return self._forward_torch(x, states, prompt=prompt)

    def _forward_native(
        self, x: torch.Tensor, states: LayerStates, *, layers: int | None = None
    ) -> torch.Tensor:
        """The C step, layer by layer (the first ``layers`` only, for its self-check)."""
        assert self._native is not None and self._native.lib is not None
        lib = self._native.lib
        B, T, C = x.shape
        M = B * T
        x = x.float().contiguous().clone()  # the residual stream, updated in place
        v_first = torch.empty(M, C, dtype=torch.float32)
        work = self._workspace(M * self._native_row_floats)
        threads = torch.get_num_threads()
        for i, struct in enumerate(self._native_layers[:layers]):
            values = [t if t.is_contiguous() else t.contiguous() for t in states.read(i)]
            shift, kv, ffn_shift = values
            lib.rwkv7_layer(
                ctypes.addressof(struct),
                i,
                B,
                T,
                C,
                self.n_head,
                self.head_size,
                self._native_ffn[i],
                native.ptr(x),
                native.ptr(shift),
                native.ptr(kv),
                native.ptr(ffn_shift),
                native.ptr(v_first),
                native.ptr(work),
                threads,
            )
            states.write(i, values)
        return x[:, -1]

    def _forward_torch(
        self, x: torch.Tensor, states: LayerStates, *, prompt: bool = False, layers: int | None = None
    ) -> torch.Tensor:
        C = x.shape[-1]
        v_first: torch.Tensor | None = None
        for i, p in enumerate(self.layers[:layers]):
            shift, kv, ffn_shift = states.read(i)
            h = F.layer_norm(x, (C,), weight=p.ln1_w, bias=p.ln1_b)
            out, v_first = self._time_mix(i, p, h, shift=shift, kv=kv, v_first=v_first, prompt=prompt)
            new_shift = h[:, -1]
            x = x + out
            h = F.layer_norm(x, (C,), weight=p.ln2_w, bias=p.ln2_b)
            x = x + self._channel_mix(p, h, ffn_shift)
            states.write(i, [new_shift, kv, h[:, -1]])
        return x[:, -1]

    def _time_mix(
        self,
        layer: int,
        p: _Layer,
        x: torch.Tensor,
        *,
        shift: torch.Tensor,
        kv: torch.Tensor,
        v_first: torch.Tensor | None,
        prompt: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        H, N, M = self.n_head, self.head_size, B * T
        x = x.reshape(1, M, C)
        xx = _shifted(shift, x.view(B, T, C)).reshape(1, M, C) - x
        # x + xx * x_r, ... : [6, M, C] (not addcmul: its fused multiply-add rounds differently)
        xr, xw, xk, xv, xa, xg = x + xx * p.mix

        r = p.receptance(xr)
        w = torch.tanh(xw @ p.w1) @ p.w2
        k = p.key(xk)
        v = p.value(xv)
        a = torch.sigmoid(p.a0 + (xa @ p.a1) @ p.a2)
        g = torch.sigmoid(xg @ p.g1) @ p.g2

        kk = F.normalize((k * p.k_k).view(M, H, N), dim=-1, p=2.0).view(M, C)
        k = k * (1 + (a - 1) * p.k_a)
        if layer == 0 or v_first is None:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(p.v0 + (xv @ p.v1) @ p.v2)
        log_w = DECAY_SCALE * torch.sigmoid((p.w0 + w).float())

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.float().reshape(B, T, H, N)

        inputs = {"r": r, "log_w": log_w, "k": k, "v": v, "kk": kk, "a": a}
        inputs = {name: heads(t) for name, t in inputs.items()}
        if self._fla is not None:
            y, kv_new = self._fla(kv, packed=prompt, **inputs)
        else:
            y, kv_new = recurrent_plain(kv, **inputs)
        if kv_new is not kv:
            kv.copy_(kv_new)
        y = y.reshape(M, C).to(self.dtype)

        y = F.group_norm(y, num_groups=H, weight=p.ln_x_w, bias=p.ln_x_b, eps=64e-5)
        y = y + ((r * k * p.r_k).view(M, H, N).sum(dim=-1, keepdim=True) * v.view(M, H, N)).view(M, C)
        return p.output(y * g).view(B, T, C), v_first

    def _channel_mix(self, p: _Layer, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = x + (_shifted(shift, x) - x) * p.ffn_x_k
        k = torch.relu(p.ffn_key(k.reshape(B * T, C))) ** 2
        return p.ffn_value(k).view(B, T, C)


class _Scratch:
    """States held in lists (the C step's self-check): read and written as they are."""

    def __init__(self, layers: list[list[torch.Tensor]]) -> None:
        self.layers = layers

    def read(self, layer: int) -> list[torch.Tensor]:
        return list(self.layers[layer])

    def write(self, layer: int, values: list[torch.Tensor]) -> None:
        for held, value in zip(self.layers[layer], values, strict=True):
            if value is not held:
                held.copy_(value)


def native_step_fits(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether the C step takes this model: heads of at most 256 (all RWKV-7 models have 64)."""
    return int(weights["blocks.0.att.r_k"].shape[-1]) <= 256


def _shifted(shift: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The previous token's input at every position: the state first, then ``x`` moved by one."""
    if x.shape[1] == 1:
        return shift.unsqueeze(1)
    return torch.cat((shift.unsqueeze(1), x[:, :-1]), dim=1)


def recurrent_plain(
    state: torch.Tensor,
    *,
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: torch.Tensor,
    a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RWKV-7 recurrence over T, in place on ``state`` [B, H, K, V] float32; inputs [B, T, H, N].

    Per token, with S in the [key, value] layout (S[k, v]):
        S = diag(w) S + (kk*a) outer (-kk^T S) + k outer v,    y = r^T S
    which is the package's ``S*w + S @ ((-kk) outer (kk*a)) + v outer k`` in [value, key].
    """
    B, T, H, N = r.shape
    S = state.view(B * H, N, N)
    w = torch.exp(log_w)
    b = kk * a
    out = torch.empty(B, T, H, N, dtype=r.dtype, device=r.device)
    for t in range(T):
        sa = torch.bmm((-kk[:, t]).reshape(B * H, 1, N), S)  # [BH, 1, V], from the state before decay
        S.mul_(w[:, t].reshape(B * H, N, 1))
        left = torch.stack((b[:, t], k[:, t]), dim=-1).reshape(B * H, N, 2)
        right = torch.cat((sa, v[:, t].reshape(B * H, 1, N)), dim=1)  # [BH, 2, V]
        S.baddbmm_(left, right)
        out[:, t] = torch.bmm(r[:, t].reshape(B * H, 1, N), S).view(B, H, N)
    return out, state
