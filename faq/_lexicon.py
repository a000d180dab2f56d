"""The matcher's word lists, kept as data: phrases, synonyms, filler words, domain words, products.

Nothing here is code; `faq._text` turns these tables into the terms that questions and topics are
compared by. Every entry applies to questions and topic files alike, so a synonym added here also
changes how the topics read. Keep each list about how people ask, never about one question.
"""

from __future__ import annotations

# Multi-word spellings, folded into one word before the question is split into words, so that
# "clear the chat" counts as one idea ("reset") and not as "clear" plus "chat". Keys are the word
# they become; values are regular expressions matched at word boundaries on lowercase text.
PHRASES: dict[str, tuple[str, ...]] = {
    "opensource": (r"open[ -]?sourced?", r"open[ -]weights?"),
    "finetune": (r"fine[ -]?tun(?:e|ed|ing|es)",),
    "dataset": (r"data[ -]sets?", r"train(?:ing)?[ -](?:sets?|corpus|corpora)"),
    "topp": (r"top[ _-]?p",),
    "release": (r"(?:come|comes|coming|came) out", r"be out", r"is out"),
    "multigpu": (
        r"multi(?:ple)?[ -]gpus?",
        r"(?:many|several|more|two|2|8|multiple) gpus",
        r"across gpus",
        r"multi(?:ple)?[ -]nodes?",
        r"(?:many|several|more) (?:nodes|machines)",
        r"gpu (?:cluster|farm)s?",
    ),
    "selfcensor": (r"self[ -]censor(?:ed|ing|s|ship)?",),
    "refusal": (r"as an ai", r"as an llm", r"i can ?not answer", r"i cant answer"),
    "huggingface": (r"hugging ?face",),
    "guardrails": (r"guard[ -]rails?", r"safety (?:filters?|rails?)"),
    "reset": (
        r"clear(?:ing)? (?:the |my |our |this )?(?:chat|history|conversation|convo|context|memory)",
        r"wipe (?:the |my )?(?:chat|history|memory)",
        r"start (?:over|fresh|again)",
        r"new (?:chat|conversation|convo)",
    ),
    "retry": (r"try again", r"another (?:reply|answer|response)", r"different (?:reply|answer)"),
    "continue": (r"keep going", r"go on"),
    "+i": (r"instruct(?:ion)?s? (?:mode|template|prompt)",),
    "+qa": (r"(?:qa|q ?& ?a|question[ -]answer(?:ing)?) (?:mode|template)",),
    "internals": (r"under the hood", r"how (?:does )?(?:it|rwkv) works?"),
    "trainingcost": (r"(?:gpu|a100) hours", r"from scratch"),
    "filename": (
        r"file ?names?",
        r"model names?",
        r"names? of (?:the|a|each) models?",
        r"(?:their|its) names?",
    ),
}

# Single words that mean the same as another word here: British spellings, abbreviations, chat
# slang and everyday names for what the FAQ calls otherwise. Keys are the word they become (it
# still goes through the stemmer); values are the words that become it.
SYNONYM_GROUPS: dict[str, tuple[str, ...]] = {
    "license": (
        "licence",
        "licences",
        "licenced",
        "licencing",
        "licensing",
        "licensed",
        "lisence",
        "mit",
        "gpl",
        "agpl",
        "bsd",
        "weights",
        "legal",
        "legally",
        "allowed",
        "permitted",
        "permission",
        "copyleft",
    ),
    "commercial": (
        "commercially",
        "commerce",
        "business",
        "company",
        "companies",
        "enterprise",
        "sell",
        "selling",
        "monetize",
        "monetise",
        "profit",
    ),
    "huggingface": ("hf",),
    "operatingsystem": ("windows", "linux", "macos", "mac", "ubuntu", "os"),
    "download": ("link", "links", "url", "downloads", "downloading"),
    "context": ("ctx",),
    "length": ("len",),
    "limit": ("max", "maximum", "unlimited", "limitless", "endless"),
    "command": ("cmd", "cmds", "commands"),
    "temperature": ("temp",),
    "raccoon": ("racoon", "raccon", "racon"),
    "censor": ("uncensored", "censorship", "nsfw", "censord", "filtered", "woke", "moderated"),
    "refusal": ("refuse", "refuses", "refused", "refusing", "refusals", "decline", "declines"),
    "opensource": ("oss", "foss"),
    "dataset": ("data", "corpus", "corpora"),
    "parallel": (
        "parallelism",
        "parallelization",
        "parallelisation",
        "parallelize",
        "parallelise",
        "parallelized",
        "parallelised",
        "parallelizing",
        "parallelising",
        "parallelizable",
        "parallelisable",
        "distributed",
    ),
    "multigpu": ("multigpus", "multinode", "cluster", "clusters"),
    "cost": ("expensive", "costly", "pricey", "price", "pricing", "money", "cheap", "cheaper", "afford"),
    "release": ("launch", "launched", "drop", "dropping", "ship", "released", "releasing"),
    "next": ("upcoming", "eta", "soon"),
    "pretraining": ("pretrain", "pretrained"),
    "throughput": ("speed", "speeds", "fast", "faster", "fastest", "slow", "slower", "quicker"),
    "use": ("used", "using"),
    "reset": ("restart", "clear", "wipe"),
    "retry": ("regenerate", "regen", "reroll", "redo", "retries", "retrying"),
    "continue": ("continuation", "proceed"),
    "chat": ("conversation", "convo", "history"),
    "architecture": ("paper", "arch", "design", "rnn", "recurrent"),
    "internals": ("internal", "internally", "inner", "workings"),
    "languages": ("language", "english", "multilingual", "chinese", "japanese"),
}

# Filler: words that carry no topic of their own. "rwkv", "bot" and "model" are in nearly every
# question and answer, so they cannot tell topics apart either (they are `DOMAIN_WORDS`).
STOPWORD_TEXT = """
rwkv bot a an the and or but if of to in on at by for with about from as into onto is are was were be
been being am do does did doing done have has had having can could would should will shall may
might must i me my mine we us our you your yours he she it its they them their this that these
those there here what which who whom whose when where why how not no yes so than then too very
just also any some all each every more most such only own same other else again ever even up down
over under off please thanks thank hi hello hey yo guys guy anyone someone somebody anybody know
tell question wondering wonder want wanna gonna gotta need get got let lets like really actually
basically pretty kind sort thing things stuff way able possible model models ok okay lol lmao
bro dude sir mate im ive id youre dont doesnt didnt cant isnt arent wont wasnt whats hows whys
wheres whos much many go going keep say said help make made makes making vs versus difference
between compared nah yeah yea yep nope rn tho though btw idk imo tbh pls plz thx ty hmm uh um
folks everyone yall ya sup wat wut wen u ur r y plus also still already anyway rly really
currently right now today guess think work works part
"""

# Words that say a question is about RWKV or this bot. A question naming another product is
# answered only when it also names one of these ("is chatgpt censored" gets no answer, "is rwkv
# censored like chatgpt" may).
DOMAIN_WORDS = frozenset(
    """
    rwkv bot model models raven raccoon racoon blinkdl wkv
    """.split()  # noqa: SIM905 (a word list reads better as text than as quoted strings)
)

# Products, services and models other than RWKV that people ask about in the same words as the
# FAQ ("the release date of the new zelda game", "is claude censored"). Lowercase single words.
OTHER_PRODUCTS = frozenset(
    """
    chatgpt gpt gpt2 gpt3 gpt4 gpt4o gpt5 openai claude anthropic llama llama2 llama3 mistral
    mixtral gemini bard copilot bing falcon bloom vicuna alpaca stablelm qwen deepseek mamba grok
    midjourney dalle diffusion sdxl zelda nintendo playstation ps5 xbox iphone ipad android
    samsung netflix spotify youtube minecraft fortnite valorant gta tesla
    """.split()  # noqa: SIM905 (a word list reads better as text than as quoted strings)
)
