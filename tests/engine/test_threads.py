"""Only the decoding thread runs torch's intra-op (OpenMP) parallel work (engine.threads).

A thread that runs a parallel region gets an OpenMP team of its own (``threads - 1`` native
threads that Python's ``threading`` does not know). The bot loads a model from an
``asyncio.to_thread`` thread and decodes on the engine's worker: if both ran parallel work there
would be two teams, more threads than CPUs, and every small parallel region of a decode step would
pay a wake-up. Checked in a fresh interpreter, counting the native threads of ``/proc/self/task``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import asyncio, json, os, sys, threading
import torch
from pathlib import Path
torch.set_num_threads(4)
from engine.batched_engine import BatchedEngine
from engine.interface import GenerationRequest, Finished, ReplyMode
from engine.sampling import SamplingParams
from engine.tokenizer import world_tokenizer

def native() -> int:
    return len(os.listdir("/proc/self/task")) - threading.active_count()

async def main() -> None:
    before = native()
    path, tok = Path(sys.argv[1]), world_tokenizer()
    engine = await asyncio.to_thread(BatchedEngine.load, path, "cpu fp32", tok, max_batch=4)
    try:
        async def one(seed: int) -> None:
            req = GenerationRequest(prompt=[1, 2, 3, 4] * 8, start=None, max_tokens=8,
                                    sampling=SamplingParams(top_p=0.0), mode=ReplyMode.FREE, seed=seed)
            async for event in engine.generate(req):
                if isinstance(event, Finished):
                    return
        await asyncio.gather(*(one(s) for s in range(4)))
        print(json.dumps({"before": before, "after": native(), "threads": torch.get_num_threads()}))
    finally:
        await engine.close()

asyncio.run(main())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_only_the_decoding_thread_starts_an_openmp_team(model_dir: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir / "v7.pth")],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    # one team of 4 (the worker's, 3 native threads); two teams would be 6
    assert counts["after"] - counts["before"] <= 3, counts
