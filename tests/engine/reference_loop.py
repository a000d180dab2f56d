"""An independent greedy generation loop over the ``rwkv`` package, run as its own process.

It imports the package the way its README says (``RWKV_V7_ON`` set before import for RWKV-7) and
applies the reference chat's penalty rules by hand, so it shares no code with the project.
Usage: python reference_loop.py MODEL VERSION PROMPT MAX_TOKENS PRESENCE FREQUENCY DECAY
Prints a JSON list of token ids.
"""

import json
import os
import sys

model_path, version, prompt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
max_tokens = int(sys.argv[4])
presence, frequency, decay = (float(x) for x in sys.argv[5:8])
if version == 7:
    os.environ["RWKV_V7_ON"] = "1"

import contextlib  # noqa: E402

import torch  # noqa: E402

with contextlib.redirect_stdout(sys.stderr):
    from rwkv.model import RWKV
    from rwkv.utils import PIPELINE

    if version == 7:
        model = RWKV(model_path.removesuffix(".pth"), "cpu fp32")
    else:
        model = RWKV(model_path, "cpu fp32", verbose=False)
pipeline = PIPELINE(model, "rwkv_vocab_v20230424")

tokens = pipeline.encode(prompt)
state = None
out = None
while tokens:
    out, state = model.forward(tokens[:256], state)
    tokens = tokens[256:]
avoid_repeat = {pipeline.encode(char)[0] for char in "，：？！"}
last = pipeline.encode(prompt)[-1]
occurrence: dict[int, float] = {}
generated = []
for _ in range(max_tokens):
    logits = out.float().clone()
    if last in avoid_repeat:
        logits[last] = -1e9
    for token_id, count in occurrence.items():
        logits[token_id] -= presence + count * frequency
    token = int(torch.argmax(logits))
    if token == 0:
        break
    for token_id in occurrence:
        occurrence[token_id] *= decay
    occurrence[token] = occurrence.get(token, 0.0) + 1.0
    generated.append(token)
    last = token
    out, state = model.forward([token], state)
print(json.dumps(generated))
