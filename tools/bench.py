"""``rwkv-discord bench``: the reference engine and the batched engine on one model, in one run.

For every concurrency level both engines get the same work, submitted all at once:

- prompt reading: every request reads its own prompt (``Engine.read``); prefill tokens/s is all
  prompt tokens over the wall time;
- decoding: every request then generates ``--tokens`` tokens from the snapshot its prompt left;
  decode tokens/s is all generated tokens over the time in which at least one request was
  decoding; time to first token is from submitting the generation to its first text; step
  latency is the time per token between consecutive pieces of text of one request (a piece held
  back inside a multi-byte character shares its gap among its tokens).

The reference engine runs one sequence at a time, so its total speed does not grow with
concurrency; it is still run at every level (``--reference-max`` caps that on slow set-ups, and
higher levels reuse the last measured number, marked as such).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import itertools
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.batched_engine import BatchedEngine
from engine.errors import EngineError
from engine.formats import inspect_model
from engine.inprocess import ReferenceEngine
from engine.interface import Engine, Finished, GenerationRequest, PromptRead, ReplyMode, TextDelta
from engine.output import OutputProcessor
from engine.sampling import SamplingParams
from engine.shapes import WORLD_VOCAB_SIZE
from engine.state import Snapshot
from engine.strategy import device_of, dtype, int8_products, precision_of, resolve_strategy
from engine.threads import call_in_new_thread
from engine.tokenizer import Tokenizer, world_tokenizer
from tools.make_model import NAMED_SHAPES, ModelShape, write_random_model
from tools.parity import check_parity

PROG = "rwkv-discord bench"


@dataclass
class Measure:
    """One engine at one concurrency level."""

    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    ttft_ms_p50: float = 0.0
    step_ms_p50: float = 0.0
    step_ms_p99: float = 0.0
    generated_tokens: int = 0
    measured: bool = True  # False: copied from a lower level (the reference's speed is flat)

    def as_dict(self) -> dict[str, Any]:
        """The numbers, rounded for JSON."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class _Run:
    first_text: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    intervals: list[tuple[float, float]] = field(default_factory=list)
    tokens: int = 0


def build_parser() -> argparse.ArgumentParser:
    """The bench's arguments."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="an RWKV-7 .pth file")
    source.add_argument("--size", choices=sorted(NAMED_SHAPES), help="a random model of a real RWKV-7 shape")
    parser.add_argument("--layers", type=int, help="a random model with this many layers")
    parser.add_argument("--embd", type=int, default=256, help="width of the random model (default: 256)")
    parser.add_argument(
        "--vocab",
        type=int,
        default=WORLD_VOCAB_SIZE,
        help="vocabulary of the random model (default: 65536, the World one); a smaller one, decoded "
        "by the World tokenizer, makes the model and the vocabulary-wide sampling cheap, so that "
        "the per-token work on the host shows, as on a GPU",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="levels, comma-separated (default: 1,8,32)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per request (default: 32)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: 64)")
    parser.add_argument(
        "--strategy",
        default="cpu fp32",
        help="e.g. 'cpu fp32', 'cpu int8' (the reference then runs fp32), 'cuda fp16', 'auto'",
    )
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="greedy decoding, without penalties (default: the chat preset's top-p and penalties)",
    )
    parser.add_argument(
        "--reference-max", type=int, help="run the reference engine only up to this concurrency"
    )
    parser.add_argument("--max-batch", type=int, help="batched engine's max batch (default: highest level)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="batched engine: eager decode steps")
    parser.add_argument("--parity", action="store_true", help="also compare logits with the rwkv package")
    parser.add_argument(
        "--graph-parity",
        action="store_true",
        help="with --parity on CUDA, also compare the CUDA-graph decode step with the same model run eagerly",
    )
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (2 for a usage or model error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.graph_parity and not args.parity:
        parser.error("--graph-parity goes with --parity")
    try:
        levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    except ValueError:
        print(f"{PROG}: error: --concurrency takes whole numbers, e.g. 1,8,32", file=sys.stderr)
        return 2
    if not levels or levels[0] < 1 or args.tokens < 1 or args.prompt_tokens < 1:
        print(f"{PROG}: error: concurrency, --tokens and --prompt-tokens must be at least 1", file=sys.stderr)
        return 2
    if not 256 <= args.vocab <= WORLD_VOCAB_SIZE or (args.model and args.vocab != WORLD_VOCAB_SIZE):
        print(f"{PROG}: error: --vocab takes 256 to 65536, for random models only", file=sys.stderr)
        return 2
    try:  # 'auto' is resolved once, here: the model file, the device and both engines follow it
        resolved = resolve_strategy(args.strategy)
    except EngineError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    args.requested_strategy, args.strategy_reason = args.strategy, resolved.reason
    args.strategy = resolved.strategy
    try:
        with tempfile.TemporaryDirectory(prefix="rwkv-bench-") as tmp:
            # written on a thread that ends: the main thread starts no OpenMP team of its own
            path = args.model or call_in_new_thread(functools.partial(_random_model, Path(tmp), args))
            report = asyncio.run(_bench(path, levels, args))
    except EngineError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    report["model"]["random"] = args.model is None
    _print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if report.get("parity") and not report["parity"]["ok"]:
        return 1
    return 0


def _random_model(folder: Path, args: argparse.Namespace) -> Path:
    shape = NAMED_SHAPES[args.size] if args.size else ModelShape(args.layers or 4, args.embd)
    shape = ModelShape(shape.n_layer, shape.n_embd, args.vocab)
    # fp16 runs store the model in fp16; others in fp32 (a bf16 run converts on loading)
    stored = dtype("fp16" if precision_of(args.strategy) == "fp16" else "fp32")
    print(
        f"writing a random RWKV-7 L{shape.n_layer} D{shape.n_embd} vocab {shape.vocab_size} model ...",
        file=sys.stderr,
    )
    return write_random_model(folder / "bench.pth", 7, shape, seed=0, dtype=stored)


async def _bench(path: Path, levels: list[int], args: argparse.Namespace) -> dict[str, Any]:

    spec = await asyncio.to_thread(inspect_model, path)
    # greedy: the most likely token, nothing else (no presence or frequency penalties)
    greedy = SamplingParams(top_p=0.0, presence_penalty=0.0, frequency_penalty=0.0)
    sampling = greedy if args.greedy else SamplingParams()
    rng = random.Random(1234)
    top = max(levels)
    prompts = [[rng.randrange(1, spec.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(top)]
    device = device_of(args.strategy)
    report: dict[str, Any] = {
        "model": {"path": str(path), "description": spec.describe()},
        "strategy": args.strategy,
        "requested_strategy": args.requested_strategy,
        "strategy_reason": args.strategy_reason,
        "device": _device_name(device),
        "tokens": args.tokens,
        "prompt_tokens": args.prompt_tokens,
        "sampling": sampling.as_dict(),
        "concurrency": levels,
        "memory_kind": "cuda max allocated" if device.startswith("cuda") else "process RSS",
    }

    _reset_memory(device)
    # A random model with a small vocabulary is read with the World tokenizer (ids below it).
    tokenizer: str | Tokenizer = "auto"
    if args.model is None and spec.vocab_size < WORLD_VOCAB_SIZE:
        tokenizer = world_tokenizer()
    # 'cpu int8' is the batched engine's own: the reference runs the same weights in fp32
    resolved = ref_strategy = args.strategy  # resolved by main
    if int8_products(resolved):
        ref_strategy = f"{device_of(ref_strategy)} fp32"
        report["reference_strategy"] = ref_strategy
    reference = await asyncio.to_thread(ReferenceEngine.load, path, ref_strategy, tokenizer)
    ref: dict[int, Measure] = {}
    try:
        await _warm_up(reference, prompts[:1], sampling)
        last: Measure | None = None
        for level in levels:
            if args.reference_max is not None and level > args.reference_max and last is not None:
                ref[level] = Measure(**{**last.__dict__, "measured": False})
                continue
            last = ref[level] = await _measure(reference, prompts[:level], args.tokens, sampling)
            print(f"reference  c={level:<4} {last.decode_tokens_per_s:10.1f} tok/s", file=sys.stderr)
        reference_memory = _memory_mb(device)
        parity = (
            await asyncio.to_thread(  # on a thread that ends, with its OpenMP team (engine.threads)
                call_in_new_thread,
                functools.partial(check_parity, reference, path, resolved, graphs=args.graph_parity),
            )
            if args.parity
            else None
        )
    finally:
        await reference.close()
        del reference
        gc.collect()  # the engine and its runner refer to each other: free the weights now

    _reset_memory(device)
    batched = await asyncio.to_thread(
        BatchedEngine.load,
        path,
        args.strategy,
        tokenizer,
        max_batch=args.max_batch or top,
        cuda_graphs=not args.no_cuda_graphs,
    )
    bat: dict[int, Measure] = {}
    try:
        for level in levels:
            await _warm_up(batched, prompts[:level], sampling)
            bat[level] = await _measure(batched, prompts[:level], args.tokens, sampling)
            print(f"batched    c={level:<4} {bat[level].decode_tokens_per_s:10.1f} tok/s", file=sys.stderr)
        batched_memory = _memory_mb(device)
        report["batched_engine"] = batched.describe()  # after the runs: a failed capture shows
    finally:
        await batched.close()

    report["memory_mb"] = {"reference": round(reference_memory, 1), "batched": round(batched_memory, 1)}
    report["results"] = [
        {
            "concurrency": level,
            "reference": ref[level].as_dict(),
            "batched": bat[level].as_dict(),
            "ratio": round(bat[level].decode_tokens_per_s / max(ref[level].decode_tokens_per_s, 1e-9), 2),
        }
        for level in levels
    ]
    if parity is not None:
        report["parity"] = parity
    return report


async def _warm_up(engine: Engine, prompts: list[list[int]], sampling: SamplingParams) -> None:
    """Compile, capture and fault in what the measured runs use (not timed)."""
    snapshots = await asyncio.gather(*(engine.read(None, p) for p in prompts))
    await asyncio.gather(*(_generate(engine, s, 4, sampling, seed=0, run=_Run()) for s in snapshots))


async def _measure(
    engine: Engine, prompts: list[list[int]], tokens: int, sampling: SamplingParams
) -> Measure:
    started = time.perf_counter()
    snapshots = await asyncio.gather(*(engine.read(None, p) for p in prompts))
    read_s = time.perf_counter() - started
    run = _Run()
    await asyncio.gather(
        *(_generate(engine, s, tokens, sampling, seed=i, run=run) for i, s in enumerate(snapshots))
    )
    busy = _union(run.intervals)
    return Measure(
        decode_tokens_per_s=run.tokens / max(busy, 1e-9),
        prefill_tokens_per_s=sum(len(p) for p in prompts) / max(read_s, 1e-9),
        ttft_ms_p50=1000 * statistics.median(run.first_text) if run.first_text else 0.0,
        step_ms_p50=1000 * _quantile(run.gaps, 0.5),
        step_ms_p99=1000 * _quantile(run.gaps, 0.99),
        generated_tokens=run.tokens,
    )


async def _generate(
    engine: Engine, start: Snapshot, tokens: int, sampling: SamplingParams, *, seed: int, run: _Run
) -> None:
    request = GenerationRequest(
        start=start,
        prompt=[],
        sampling=sampling,
        mode=ReplyMode.FREE,
        max_tokens=tokens,
        extra_tokens=0,
        seed=seed,
    )
    submitted = time.perf_counter()
    began = submitted
    times: list[float] = []
    pieces: list[str] = []
    async for event in engine.generate(request):
        now = time.perf_counter()
        if isinstance(event, PromptRead):
            began = now
        elif isinstance(event, TextDelta):
            if not times:
                run.first_text.append(now - submitted)
            times.append(now)
            pieces.append(event.text)
        elif isinstance(event, Finished):
            run.tokens += len(event.tokens)
            run.intervals.append((began, now))
            run.gaps.extend(_token_gaps(times, pieces, event.tokens, engine.tokenizer))


def _token_gaps(
    times: Sequence[float], pieces: Sequence[str], tokens: list[int], tokenizer: Tokenizer
) -> list[float]:
    """Time per token between pieces of text, one value per token.

    A piece can carry several tokens: text is held back while it ends inside a character, and a
    caller that falls behind gets the waiting text as one piece. The engines' emission rule is
    replayed to learn which tokens each piece holds, and the gap is shared among them.
    """
    emitted_pieces = _emissions(tokens, tokenizer)  # (tokens, text) of each emission, in order
    counts: list[int] = []
    queue = iter(emitted_pieces)
    for piece in pieces:  # each piece received is one or more emissions joined
        count, text = 0, ""
        while len(text) < len(piece):
            step = next(queue, None)
            if step is None:
                break
            count, text = count + step[0], text + step[1]
        if text != piece:  # not the rule this bench knows: plain gaps
            return [b - a for a, b in itertools.pairwise(times)]
        counts.append(count)
    gaps: list[float] = []
    for (before, after), count in zip(itertools.pairwise(times), counts[1:], strict=True):
        gaps.extend([(after - before) / count] * count)
    return gaps


def _emissions(tokens: list[int], tokenizer: Tokenizer) -> list[tuple[int, str]]:
    """The pieces of text the engines stream for ``tokens``, with how many tokens each holds."""
    request = GenerationRequest(None, [], SamplingParams(), ReplyMode.FREE, max_tokens=len(tokens) + 1)
    output = OutputProcessor(request, tokenizer)
    pieces: list[tuple[int, str]] = []
    before = 0
    for token in tokens:
        events, _ = output.accept(token)  # a free generation's stop rules do not change the pieces
        pieces += [(output.emitted - before, e.text) for e in events if isinstance(e, TextDelta)]
        before = output.emitted
    rest = output.rest()
    if rest is not None:
        pieces.append((len(tokens) - before, rest.text))
    return pieces


def _union(intervals: Sequence[tuple[float, float]]) -> float:
    """Total length covered by the intervals."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _reset_memory(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def _memory_mb(device: str) -> float:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(torch.device(device)) / 1e6
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:  # not Linux: the peak instead
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def _print_table(report: dict[str, Any]) -> None:
    sampling = report["sampling"]
    how = (
        "greedy"
        if sampling["top_p"] <= 0
        else f"temperature {sampling['temperature']} top_p {sampling['top_p']}"
    )
    model = report["model"]
    where = "random" if model["random"] else model["path"]
    print(f"{model['description']} ({where}), {report['strategy']} on {report['device']}")
    if report["requested_strategy"] != report["strategy"]:
        print(
            f"strategy: {report['requested_strategy']!r} resolved to {report['strategy']!r}: "
            f"{report['strategy_reason']}"
        )
    if "reference_strategy" in report:
        print(f"reference: {report['reference_strategy']} (the same weights; the rwkv package has no int8)")
    print(f"prompt {report['prompt_tokens']} tokens, {report['tokens']} new tokens per request, {how}")
    print(f"batched: {report.get('batched_engine', '')}")
    head = (
        f"{'conc':>5} {'engine':<10} {'decode tok/s':>13} {'prefill tok/s':>14} {'TTFT p50 ms':>12} "
        f"{'step p50 ms':>12} {'step p99 ms':>12}"
    )
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        for name in ("reference", "batched"):
            m = row[name]
            mark = "" if m["measured"] else " (as c=lower)"
            print(
                f"{row['concurrency']:>5} {name:<10} {m['decode_tokens_per_s']:>13.1f} "
                f"{m['prefill_tokens_per_s']:>14.1f} {m['ttft_ms_p50']:>12.1f} {m['step_ms_p50']:>12.1f} "
                f"{m['step_ms_p99']:>12.1f}{mark}"
            )
        print(f"{'':>5} {'ratio':<10} {row['ratio']:>12.2f}x")
    memory = report["memory_mb"]
    print(
        f"memory ({report['memory_kind']}): reference {memory['reference']:.0f} MB, "
        f"batched {memory['batched']:.0f} MB"
    )
    if "parity" in report:
        p = report["parity"]
        verdict = "ok" if p["ok"] else "FAILED"
        print(
            f"logits parity vs the rwkv package: decode {p['decode_rel_err']:.2e} (limit {p['limit']:.2g}), "
            f"prefill {p['prefill_rel_err']:.2e} (limit {p['prefill_limit']:.2g}: the package differs "
            f"from itself by {p['reference_self_rel_err']:.2e}): {verdict} [{p['kernels']}]"
        )
        if "short_prefill_rel_err" in p:
            print(
                f"int8: prefill judged over prompts of {p['prefill_tokens']}+ tokens; after "
                f"{p['short_prefill_tokens']} tokens from a blank state {p['short_prefill_rel_err']:.2e} "
                "(not judged: see tools/parity.py)"
            )
        if "graphs_rel_err" in p:
            print(
                f"CUDA graphs vs the same model run eagerly: {p['graphs_rel_err']:.2e} "
                f"(limit {p['graphs_limit']:.2g})"
            )
        if "graphs_error" in p:
            print(f"CUDA graphs vs the same model run eagerly: FAILED ({p['graphs_error']})")


if __name__ == "__main__":
    sys.exit(main())
