"""How far a reduced-precision strategy's logits are from another's on the same model.

    python -m tools.accuracy MODEL.pth [--strategy 'cpu int8'] [--against 'cpu fp32']
                             [--sequences 4] [--steps 64] [--prompt-tokens 8] [--seed 0]

Both engines read the same random prompts, then decode teacher-forced: each step feeds both the
token the ``--against`` model picks greedily, so they stay on one text. Prints the relative logit
error (largest and mean, each over the step's logits) and how often the greedy tokens agree.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from engine.runner import ModelRunner


def measure(
    model: Path, strategy: str, against: str, *, sequences: int, steps: int, prompt_tokens: int, seed: int
) -> dict[str, float]:
    """The numbers :func:`main` prints."""
    test = ModelRunner.load(model, strategy, max_slots=sequences, cuda_graphs=False)
    base = ModelRunner.load(model, against, max_slots=sequences, cuda_graphs=False)
    gen = torch.Generator().manual_seed(seed)
    slots = list(range(sequences))
    prompts = torch.randint(0, base.vocab_size, (sequences, prompt_tokens), generator=gen).tolist()
    for runner in (test, base):
        for slot in slots:
            runner.zero_slot(slot)
    want, got = base.prefill(slots, prompts, logits=True), test.prefill(slots, prompts, logits=True)
    largest, mean, agree = [], [], 0
    for _ in range(steps):
        assert want is not None and got is not None
        diff = (got - want).abs()
        largest.append(float((diff.max(dim=-1).values / want.abs().max(dim=-1).values).max()))
        mean.append(float((diff.mean(dim=-1) / want.abs().mean(dim=-1)).mean()))
        tokens = want.argmax(-1)
        agree += int((got.argmax(-1) == tokens).sum())
        want, got = base.decode(slots, tokens.tolist()), test.decode(slots, tokens.tolist())
    return {
        "largest_rel": max(largest),
        "mean_rel": statistics.fmean(mean),
        "greedy_agree": agree,
        "greedy_steps": steps * sequences,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.accuracy", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an RWKV-7 .pth file")
    parser.add_argument("--strategy", default="cpu int8", help="the strategy measured (default: 'cpu int8')")
    parser.add_argument("--against", default="cpu fp32", help="the strategy it is measured against")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64, help="teacher-forced decode steps")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with torch.no_grad():
        numbers = measure(
            args.model,
            args.strategy,
            args.against,
            sequences=args.sequences,
            steps=args.steps,
            prompt_tokens=args.prompt_tokens,
            seed=args.seed,
        )
    print(
        f"{args.strategy} against {args.against}: logits {numbers['mean_rel']:.2%} mean relative error, "
        f"{numbers['largest_rel']:.2%} at most; greedy token agreed in {numbers['greedy_agree']} of "
        f"{numbers['greedy_steps']} teacher-forced steps"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
