"""State-tuned openings: an RWKV-PEFT state-tuning file as a preset's opening state.

State tuning (RWKV-PEFT) trains only the initial recurrent state and writes it as a ``.pth``
holding, per layer, ``blocks.N.att.time_state`` of shape [heads, head_size, head_size]. The
trained matrix is stored transposed against the inference layout of the time-mixing state
(RWKV-7: 0=att_x_prev 1=att_kv 2=ffn_x_prev per layer), so it is read as
``time_state.transpose(1, 2)``, as the RWKV authors' chat demos load it; the two token-shift
vectors start at zero. Only tensors are read (``weights_only``): no code in the file runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from engine.errors import StateMismatchError
from engine.interface import Engine
from engine.state import Snapshot

KEY = "blocks.{}.att.time_state"


def read_state_file(path: Path, n_layer: int, n_head: int, head_size: int) -> list[torch.Tensor]:
    """Each layer's trained att_kv matrix in the inference layout (float32, on the CPU);
    StateMismatchError when the file is not a state of this model's shape."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: pickle, zip and torch errors alike
        raise StateMismatchError(f"state file {path.name} cannot be read: {exc}") from exc
    if not isinstance(raw, dict):
        raise StateMismatchError(f"state file {path.name} holds no tensors by name")
    expected = (n_head, head_size, head_size)
    layers: list[torch.Tensor] = []
    for layer in range(n_layer):
        tensor = raw.get(KEY.format(layer))
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != expected:
            shape = None if not isinstance(tensor, torch.Tensor) else tuple(tensor.shape)
            raise StateMismatchError(
                f"state file {path.name}: {KEY.format(layer)} should be {list(expected)}, not {shape}: "
                "it was tuned for another model"
            )
        layers.append(tensor.transpose(1, 2).to(torch.float32).contiguous())
    extra = [k for k in raw if not (k.startswith("blocks.") and k.endswith(".att.time_state"))]
    if extra or len(raw) != n_layer:
        raise StateMismatchError(f"state file {path.name} has other keys than {n_layer} layers' time_state")
    return layers


async def tuned_opening(engine: Engine, path: Path) -> Snapshot:
    """The opening state of a state-tuned preset, placed as the engine places its states.

    Its logits are zeros: every use of an opening feeds a prompt on top of it first.
    """
    spec = engine.spec
    if spec.family != 7:
        raise StateMismatchError(f"state files are for RWKV-7 models, not RWKV-{spec.family}")
    layers = await asyncio.to_thread(read_state_file, path, spec.n_layer, spec.n_head, spec.head_size)
    probe = await engine.read(None, [0])  # the engine's own layout: dtypes and devices
    tensors = [torch.zeros_like(t) for t in probe.tensors]
    for layer, matrix in enumerate(layers):
        slot = tensors[3 * layer + 1]
        tensors[3 * layer + 1] = matrix.to(device=slot.device, dtype=slot.dtype)
    return Snapshot(tensors, torch.zeros_like(probe.logits), None, probe.fingerprint, {})
