"""How the matcher reads casual questions: filler, synonyms, version and file-name tokens, ties,
"did you mean", one common word, and questions about other products."""

from __future__ import annotations

from pathlib import Path

import pytest

from faq import FaqIndex, Topic, bundled_topics_dir, load_topics
from faq._lexicon import DOMAIN_WORDS, OTHER_PRODUCTS, PHRASES, SYNONYM_GROUPS
from faq._text import KILO_TOKENS, STOPWORDS, SYNONYMS, VERSION, canonical, raw_tokens, terms


@pytest.fixture(scope="module")
def index() -> FaqIndex:
    """An index over the bundled topics."""
    return FaqIndex(load_topics([bundled_topics_dir()]).topics.values())


def _topic(topic_id: str, title: str, keywords: tuple[str, ...], body: str = "Answer.") -> Topic:
    """A topic built in memory."""
    return Topic(topic_id, title, keywords, (), (), body, Path(f"{topic_id}.md"))


def _answer(index: FaqIndex, question: str) -> str | None:
    found = index.best(question)
    return found.topic.id if found else None


# --- filler words -------------------------------------------------------------------------------


@pytest.mark.parametrize("filler", ["hey", "nah", "pls", "yo", "lol", "tbh", "rn", "btw"])
def test_chat_filler_is_no_term(filler: str) -> None:
    """Greetings and chat slang carry no topic."""
    assert filler in STOPWORDS or canonical(filler) is None


def test_a_setting_with_a_value_is_no_question(index: FaqIndex) -> None:
    """ "-top_p=0 how are you today?" sets top_p for a chat message; it does not ask about it."""
    assert terms("-top_p=0 -temp=0.7 how are you today?") == []
    assert index.lookup("-top_p=0 how are you today?").answer is None
    assert _answer(index, "-temp") == "chat-commands"
    assert _answer(index, "what does top_p do") == "chat-commands"


def test_filler_does_not_pull_a_match_under_the_threshold(index: FaqIndex) -> None:
    """Wrapping a question in chat filler leaves its confidence as it was."""
    plain = index.match("is the model censored")[0]
    chatty = index.match("hey yo is the model censored or nah pls lol")[0]
    assert chatty == plain
    assert _answer(index, "hey yo is the model censored or nah pls lol") == "censorship"


# --- synonyms -----------------------------------------------------------------------------------


def test_synonym_table_is_data_without_clashes() -> None:
    """Every variant belongs to one group, and no group word is itself a variant of another."""
    variants = [word for words in SYNONYM_GROUPS.values() for word in words]
    assert len(variants) == len(set(variants)), "a word in two synonym groups"
    assert all(word == word.lower() and " " not in word for word in variants)
    assert not set(SYNONYM_GROUPS) & set(SYNONYMS), "a group's own word is a variant of another"
    assert all(patterns for patterns in PHRASES.values())


@pytest.mark.parametrize(
    ("variant", "same_as"),
    [
        ("clear the chat", "reset"),
        ("clear my history", "reset"),
        ("regenerate", "retry"),
        ("reroll", "retry"),
        ("instruction mode", "+i"),
        ("weights", "license"),
        ("MIT", "license"),
        ("GPL", "license"),
        ("legally", "license"),
        ("paper", "architecture"),
        ("multi node", "multigpu"),
        ("several machines", "multigpu"),
        ("under the hood", "internals"),
        ("racoon", "raccoon"),
    ],
)
def test_everyday_words_fold_into_the_faq_words(variant: str, same_as: str) -> None:
    """A variant and the word the FAQ uses give the same terms."""
    assert terms(variant) == terms(same_as)


@pytest.mark.parametrize(
    ("question", "topic"),
    [
        ("how can I clear my chat history with the bot", "chat-commands"),
        ("can the bot regenerate its reply", "chat-commands"),
        ("how does instruction mode work", "chat-commands"),
        ("under what license are the weights", "license"),
        ("is rwkv MIT licensed", "license"),
        ("where is the rwkv paper", "architecture"),
        ("can rwkv be trained multi node", "training-parallelization"),
    ],
)
def test_synonyms_find_their_topic(index: FaqIndex, question: str, topic: str) -> None:
    """Questions in everyday words reach the topic that uses the FAQ's words."""
    assert _answer(index, question) == topic


# --- version and file-name tokens ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("rwkv6", ["rwkv", VERSION]),
        ("RWKV-6", ["rwkv", VERSION]),
        ("rwkv 6", ["rwkv", VERSION]),
        ("v5", [VERSION]),
        ("rwkv v7", ["rwkv", VERSION]),
        ("ctx4096", ["ctx", "4096"]),
        ("RWKV-4-Raven-14B-ctx8192", ["rwkv", VERSION, "raven", "14b", "ctx", "8192"]),
        ("a100", ["a100"]),
        ("2 gpus", ["multigpu"]),
    ],
)
def test_version_and_file_name_tokens_are_split(text: str, tokens: list[str]) -> None:
    """A name glued to a number is split; a number after "rwkv" is a version."""
    assert raw_tokens(text) == tokens


def test_sizes_and_token_counts() -> None:
    """Model sizes name no topic; every token count ("4k", "32k") is one term."""
    assert canonical("14b") is None
    assert canonical("4k") == canonical("32k") == KILO_TOKENS
    assert terms("ctx4096") == ["context"]


@pytest.mark.parametrize(
    ("question", "topic"),
    [
        ("rwkv6 when", "next-release"),
        ("any eta for v8", "next-release"),
        ("what does ctx8192 mean", "context-length"),
        ("does rwkv 5 have a 32k context", "context-length"),
        ("what data was rwkv4 trained on", "training-data"),
    ],
)
def test_versions_and_file_names_in_questions(index: FaqIndex, question: str, topic: str) -> None:
    """Version and file-name tokens are understood, not counted as unknown words."""
    assert _answer(index, question) == topic


# --- paraphrases, links and signs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "same_as"),
    [
        ("how long can my prompt be", "context length"),
        ("max input size", "max context length"),
        ("long conversations", "long context"),
        ("what was it trained on", "train dataset"),
        ("how much $$", "money"),
        ("on one gpu", "single gpu"),
        ("lots of gpus", "multi gpu"),
        ("as an ai language model", "refusal"),
        ("sometimes across till", ""),
    ],
)
def test_paraphrases_fold_into_the_faq_words(variant: str, same_as: str) -> None:
    """Everyday ways of asking give the terms of the FAQ's own words; adverbs and prepositions
    give none."""
    assert terms(variant) == terms(same_as)


def test_trained_on_hardware_is_no_question_about_data() -> None:
    """ "trained on multiple gpus" asks about hardware, "trained on the pile" about data."""
    assert "dataset" not in terms("can it be trained on multiple gpus")
    assert "dataset" in terms("was it trained on the pile")


def test_links_give_no_words() -> None:
    """Hosts and paths of a link in an answer are not words of the topic."""
    assert terms("see https://huggingface.co/docs/transformers/v4.15.0/parallelism here") == terms("see here")


def test_a_setting_without_a_value_is_asked_about(index: FaqIndex) -> None:
    """ "-temp=" with nothing after it asks what the setting does."""
    assert terms("what is -temp= for") == terms("temperature")
    assert _answer(index, "what is -temp= for") == "chat-commands"


@pytest.mark.parametrize(
    ("question", "topic"),
    [
        ("is the raven model uncensored", "censorship"),
        ("does raven refuse stuff", "censorship"),
        ("what data went into raven", "training-data"),
        ("raven?", "training-data"),
        ("eta for the next world model?", "next-release"),
    ],
)
def test_model_names_count_less_beside_other_words(index: FaqIndex, question: str, topic: str) -> None:
    """A model name says which model a question is about; the other words say what it asks."""
    assert _answer(index, question) == topic


def test_answer_text_words_count_less_than_unknown_words() -> None:
    """A word the FAQ has only in an answer lowers a topic's share less than an unknown word."""
    index = FaqIndex(
        [
            _topic("alpha", "Alpha setup", ("alpha",), body="Mind the zulu."),
            _topic("beta", "Beta guide", ("beta",)),
            _topic("other", "Something else", ("other",)),
        ]
    )
    assert index.match("alpha zulu")[0].confidence > index.match("alpha quux")[0].confidence
    assert _answer(index, "alpha zulu") == "alpha"
    assert _answer(index, "alpha quux") is None


def test_short_unknown_words_count_less(index: FaqIndex) -> None:
    """An unknown word of one or two letters ("rp") is mostly chat slang."""
    assert index.match("nsfw rp")[0].confidence > index.match("nsfw rpg")[0].confidence
    assert _answer(index, "can it do nsfw rp") == "censorship"


def test_several_title_words_answer_without_a_keyword(index: FaqIndex) -> None:
    """Without RWKV named and without a keyword, three words of a topic's title and aliases
    answer; two do not."""
    assert _answer(index, "how long would it take to train on one gpu") == "training-cost"
    assert _answer(index, "how much does a gpu cost") is None


# --- one common word is not enough --------------------------------------------------------------


@pytest.mark.parametrize("message", ["thanks bot!", "good bot", "the bot", "rwkv", "model?"])
def test_naming_the_bot_alone_gets_no_answer(index: FaqIndex, message: str) -> None:
    """Words every topic shares ("bot", "rwkv", "model") answer nothing."""
    assert index.lookup(message).answer is None


def test_a_word_several_topics_share_is_not_enough() -> None:
    """One title word found in two topics is too little evidence, though it scores high."""
    index = FaqIndex(
        [
            _topic("setup", "Server setup guide", ("install",)),
            _topic("guide", "Style guide", ("style",)),
            _topic("other", "Something else", ("other",)),
        ]
    )
    assert index.match("guide")[0].confidence >= index.threshold
    assert index.best("guide") is None
    assert index.best("install") is not None


def test_off_domain_question_needs_a_keyword(index: FaqIndex) -> None:
    """A question that names neither RWKV nor the bot needs a keyword of the topic, not only
    words of its title or answer."""
    assert index.match("how much does a graphics card cost")[0].topic.id == "training-cost"
    assert index.best("how much does a graphics card cost") is None
    assert _answer(index, "how much does rwkv training cost") == "training-cost"


# --- another product ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "question",
    [
        "is claude censored",
        "when does the new iphone come out",
        "what license does llama use",
        "what dataset was mistral trained on",
        "what's the context length of gpt4",
    ],
)
def test_questions_about_other_products_get_no_answer(index: FaqIndex, question: str) -> None:
    """Naming another product without RWKV, its models or the bot gets no answer."""
    assert index.lookup(question).answer is None


def test_a_product_name_does_not_pull_an_rwkv_question_down(index: FaqIndex) -> None:
    """With RWKV named, another product's name neither helps nor hurts the score."""
    plain = index.match("is rwkv censored")[0]
    compared = index.match("is rwkv censored, claude is")[0]
    assert compared == plain
    assert _answer(index, "is rwkv censored like claude") == "censorship"


def test_domain_and_product_lists_do_not_overlap() -> None:
    """RWKV's own names are never "another product"."""
    assert not DOMAIN_WORDS & OTHER_PRODUCTS
    assert all(word == word.lower() and word.isalnum() for word in DOMAIN_WORDS | OTHER_PRODUCTS)


# --- ties and "did you mean" --------------------------------------------------------------------


def test_equal_scores_are_a_tie_offered_as_did_you_mean() -> None:
    """Two topics that explain a question equally well are both offered, not one picked."""
    index = FaqIndex(
        [
            _topic("zebra", "Zebra crossings", ("zebra",)),
            _topic("apple", "Apple pie", ("apple",)),
            _topic("other", "Something else", ("other",)),
        ],
        threshold=0.5,
    )
    found = index.lookup("apple zebra")
    assert found.answer is None and found.tied
    assert {m.topic.id for m in found.candidates} == {"apple", "zebra"}
    assert [m.confidence for m in found.candidates] == [0.5, 0.5]


def test_close_scores_are_settled_by_keywords_not_by_id() -> None:
    """Within the tie margin, the topic with keyword evidence wins over one that scores a little
    higher on title and answer words, whatever the order of the topic ids."""
    index = FaqIndex(
        [
            # "aaa" has "backup" in its title and "disk" in its answer: 0.525 of "backup disk".
            _topic("aaa", "Backup tips", ("tips",), body="Mind the disk."),
            # "zzz" has "backup" as a keyword: 0.5, and the only keyword evidence.
            _topic("zzz", "Saving", ("backup",)),
            _topic("other", "Disk space", ("space",)),
        ],
        threshold=0.5,
    )
    ranked = index.match("backup disk")
    assert [(m.topic.id, m.confidence) for m in ranked[:2]] == [("aaa", 0.525), ("zzz", 0.5)]
    found = index.lookup("backup disk")
    assert found.answer is not None and found.answer.topic.id == "zzz"
    assert not found.tied


def test_tie_order_does_not_depend_on_topic_order() -> None:
    """The same topics given in any order give the same lookup."""
    topics = [
        _topic("zebra", "Zebra crossings", ("zebra",)),
        _topic("apple", "Apple pie", ("apple",)),
        _topic("other", "Something else", ("other",)),
    ]
    first = FaqIndex(topics, threshold=0.5).lookup("apple zebra")
    assert first.tied
    assert first == FaqIndex(list(reversed(topics)), threshold=0.5).lookup("apple zebra")


def test_no_answer_suggests_the_closest_topics(index: FaqIndex) -> None:
    """Below the threshold, the closest topics are offered, best first, at most three."""
    found = index.lookup("tell me about tokens")
    assert found.answer is None and not found.tied
    assert 1 <= len(found.candidates) <= 3
    assert "context-length" in [m.topic.id for m in found.candidates]
    confidences = [m.confidence for m in found.candidates]
    assert confidences == sorted(confidences, reverse=True)


def test_nothing_close_suggests_nothing(index: FaqIndex) -> None:
    """A message far from every topic gets neither an answer nor suggestions."""
    assert index.lookup("how do I bake bread") == type(index.lookup(""))(None)


def test_an_answer_has_no_candidates(index: FaqIndex) -> None:
    """A clear answer comes alone."""
    found = index.lookup("what license is rwkv under")
    assert found.answer is not None and found.answer.topic.id == "license"
    assert found.candidates == () and not found.tied


def test_a_tie_on_a_shared_title_word_is_only_a_suggestion() -> None:
    """Two topics that tie on one word they share are suggested, not offered as "did you mean"."""
    index = FaqIndex(
        [
            _topic("guide", "Disk guide", ("alpha",)),
            _topic("setup", "Disk setup", ("beta",)),
            _topic("other", "Something else", ("other",)),
        ]
    )
    found = index.lookup("disk")
    assert found.answer is None and not found.tied
    assert {m.topic.id for m in found.candidates} == {"guide", "setup"}


@pytest.mark.parametrize(
    "question",
    [
        "what license does the llama model use",  # "model" is Llama's here, not RWKV's
        "is the claude model censored",
        "what does an a100 cost",  # a GPU's price, not what training RWKV costs
        "a100 price",
        "when is the next ubuntu release",
        "when is the next release of python",
    ],
)
def test_other_products_get_no_answer(index: FaqIndex, question: str) -> None:
    """A question about another product (or hardware) is not answered with an RWKV topic, even
    when it says "model"."""
    assert index.lookup(question).answer is None


@pytest.mark.parametrize(
    ("question", "topic"),
    [
        ("is the rwkv model censored like claude", "censorship"),
        ("how many a100 hours to train rwkv", "training-cost"),
        ("how long would it take on a single a100", "training-cost"),
    ],
)
def test_naming_rwkv_beside_another_product_still_answers(index: FaqIndex, question: str, topic: str) -> None:
    """Naming RWKV itself beside another product keeps the answer."""
    found = index.lookup(question)
    assert found.answer is not None and found.answer.topic.id == topic


def test_a_wall_of_text_is_read_from_its_start_only(index: FaqIndex) -> None:
    """A 20,000-character message is cut before the phrase patterns run over it (they cost
    0.1 s a lookup on the whole text): what its start asks is answered, its far end is not read."""
    assert index.lookup("what license is rwkv under " + "x " * 10_000).answer is not None
    assert index.lookup("x " * 10_000 + "what license is rwkv under").answer is None
