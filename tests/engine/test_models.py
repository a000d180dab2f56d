"""Model files: versions read from the keys, make-model shapes, and broken files refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chat.session import ChatService
from engine.errors import ModelFileError, TokenizerError
from engine.formats import inspect_model
from engine.inprocess import ReferenceEngine
from engine.tokenizer import JsonTokenizer
from tests.conftest import open_service
from tools.make_model import NAMED_SHAPES, ModelShape, random_weights, rwkv7_lora_dims, write_random_model


@pytest.mark.parametrize(("version", "expected"), [(4, 4.0), (5, 5.2), (6, 6.0), (7, 7.0)])
def test_version_is_read_from_the_keys(model_dir: Path, version: int, expected: float) -> None:
    """make-model files of each version are recognised as that version, with their shape."""
    spec = inspect_model(model_dir / f"v{version}.pth")
    assert spec.version == expected
    assert (spec.n_layer, spec.n_embd, spec.vocab_size) == (2, 64, 65536)
    assert spec.is_world


def test_real_shape_names_match_the_published_sizes() -> None:
    """Size names give the real RWKV-7 shapes and low-rank sizes of the anchors file."""
    assert NAMED_SHAPES["1.5B"] == ModelShape(24, 2048, 65536)
    assert rwkv7_lora_dims(2048) == (96, 96, 64, 256)
    assert rwkv7_lora_dims(768) == (64, 64, 32, 128)
    assert rwkv7_lora_dims(4096) == (128, 128, 96, 480)


def test_fingerprint_is_stable_across_precisions_and_differs_between_models(tmp_path: Path) -> None:
    """The same weights in bf16 share the fingerprint; other weights do not."""
    shape = ModelShape(1, 32, 300)
    a = inspect_model(write_random_model(tmp_path / "a.pth", 7, shape, seed=1))
    b = inspect_model(write_random_model(tmp_path / "b.pth", 7, shape, seed=1, dtype=torch.bfloat16))
    c = inspect_model(write_random_model(tmp_path / "c.pth", 7, shape, seed=2))
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint


def _broken_files(tmp_path: Path, model_dir: Path) -> dict[str, tuple[Path, str]]:
    good = (model_dir / "v7.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("this is not a model")
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
    partial = tmp_path / "partial.pth"
    weights = random_weights(7, ModelShape(2, 32, 100))
    del weights["blocks.1.att.r_k"]
    torch.save(weights, partial)
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_dict)
    wrong_name = tmp_path / "model.bin"
    wrong_name.write_bytes(good)
    return {
        "truncated": (truncated, "truncated or corrupt"),
        "text": (text, "not a readable PyTorch .pth file"),
        "other": (other, "does not look like an RWKV model"),
        "partial": (partial, "has no blocks.1.att.r_k"),
        "not_dict": (not_dict, "state dict of tensors"),
        "missing": (tmp_path / "nope.pth", "not found"),
        "suffix": (wrong_name, "must end in .pth"),
    }


@pytest.mark.parametrize("case", ["truncated", "text", "other", "partial", "not_dict", "missing", "suffix"])
def test_broken_model_files_are_refused_clearly(tmp_path: Path, model_dir: Path, case: str) -> None:
    """Truncated, non-PyTorch, non-RWKV and incomplete files get a one-line reason."""
    path, reason = _broken_files(tmp_path, model_dir)[case]
    with pytest.raises(ModelFileError, match=reason) as info:
        ReferenceEngine.load(path)
    assert "\n" not in str(info.value)


def test_pile_model_needs_its_tokenizer(tmp_path: Path) -> None:
    """A non-World vocabulary without a tokenizer.json says which setting to use."""
    path = write_random_model(tmp_path / "raven.pth", 4, ModelShape(1, 32, 50277))
    with pytest.raises(TokenizerError, match="RWKV_DISCORD_TOKENIZER"):
        ReferenceEngine.load(path)


async def test_pile_model_chats_with_its_tokenizer_json(pile_model: Path, tmp_path: Path) -> None:
    """RWKV-4 with a tokenizer.json beside it loads (auto) and runs the chat grammar."""
    engine = ReferenceEngine.load(pile_model)
    assert isinstance(engine.tokenizer, JsonTokenizer)
    assert engine.spec.family == 4
    service: ChatService = await open_service(engine, tmp_path / "db.sqlite3", default_preset="raven-chat")
    try:
        reply = await service.respond("c", "-top_p=0 Hello there")
        assert reply.kind == "reply" and reply.tokens
        gen = await service.respond("c", "+gen Hello")
        assert gen.kind == "generation"
    finally:
        await service.store.close()
        await engine.close()


def test_trailing_blank_line_becomes_two_newlines(pile_model: Path) -> None:
    """A prompt ending in a one-token blank line is fed as two newline tokens, as in training."""
    tokenizer = JsonTokenizer(pile_model.with_name("tokenizer.json"))
    plain = tokenizer.encode("I am fine.\n\n")
    assert tokenizer.decode(plain[-1:]) == "\n\n"
    fixed = tokenizer.encode_prompt("I am fine.\n\n")
    assert fixed[-2:] == [tokenizer.newline_id, tokenizer.newline_id]
    assert tokenizer.decode(fixed) == "I am fine.\n\n"


def test_malformed_keys_are_refused_clearly(tmp_path: Path) -> None:
    """Odd block keys or wrong tensor ranks give a ModelFileError, not a traceback."""
    weights = random_weights(7, ModelShape(1, 32, 100))
    weights["blocks.extra"] = torch.zeros(1)
    torch.save(weights, tmp_path / "odd.pth")
    with pytest.raises(ModelFileError, match="not a well-formed RWKV model"):
        inspect_model(tmp_path / "odd.pth")
    weights = random_weights(7, ModelShape(1, 32, 100))
    weights["blocks.0.att.r_k"] = torch.zeros(32)
    torch.save(weights, tmp_path / "flat.pth")
    with pytest.raises(ModelFileError, match="not a well-formed RWKV model"):
        inspect_model(tmp_path / "flat.pth")


def test_old_pytorch_format_is_accepted(tmp_path: Path) -> None:
    """A model saved in PyTorch's older (not zip) format loads; it cannot be memory-mapped."""
    weights = random_weights(7, ModelShape(1, 32, 100))
    path = tmp_path / "legacy.pth"
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    assert inspect_model(path).version == 7.0


@pytest.mark.parametrize(("version", "engine"), [(7, "BatchedEngine"), (4, "ReferenceEngine")])
async def test_auto_engine_is_batched_for_rwkv7(model_dir: Path, version: int, engine: str) -> None:
    """engine=auto runs RWKV-7 on the batched engine and older versions on the rwkv package."""
    from bot.app import load_engine
    from bot.settings import load_settings

    loaded = await load_engine(load_settings(model=model_dir / f"v{version}.pth", engine="auto"))
    try:
        assert type(loaded).__name__ == engine
    finally:
        await loaded.close()


def test_world_tokenizer_matches_the_package_trie() -> None:
    """Our World tokenizer gives the package's tokens (greedy longest match) and pieces."""
    import random

    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from engine.tokenizer import world_tokenizer

    ours = world_tokenizer()
    theirs = TRIE_TOKENIZER(str(Path(rwkv.__file__).with_name("rwkv_vocab_v20230424.txt")))
    assert ours._pieces == theirs.idx2token
    rng = random.Random(0)
    alphabet = "ab XY\n\n\t,.!?的是了我中文日本語é🙂😀\x00\x7f" + "".join(
        chr(rng.randrange(32, 0x2FFF)) for _ in range(300)
    )
    texts = ["", "Hello, world!\n\nUser: hi", "\n" * 7, "a" * 300, Path(__file__).read_text()]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60))) for _ in range(2000)]
    for text in texts:
        assert ours.encode(text) == theirs.encodeBytes(text.encode("utf-8")), text
        assert ours.decode(ours.encode(text)) == text
