"""The matcher's word lists, kept as data: phrases, synonyms, filler words, domain words, products.

Nothing here is code; `faq._text` turns these tables into the terms that questions and topics are
compared by. Every entry applies to questions and topic files alike, so a synonym added here also
changes how the topics read. Keep each list about how people ask, never about one question.
"""

from __future__ import annotations

# Multi-word spellings, folded into one word before the question is split into words, so that
# "clear the chat" counts as one idea ("reset") and not as "clear" plus "chat". Keys are the words
# they become; values are regular expressions matched at word boundaries on lowercase text.
PHRASES: dict[str, tuple[str, ...]] = {
    "opensource": (r"open[ -]?sourced?", r"open[ -]weights?"),
    "finetune": (r"fine[ -]?tun(?:e|ed|ing|es)",),
    "dataset": (r"data[ -]sets?", r"train(?:ing)?[ -](?:sets?|corpus|corpora)"),
    "topp": (r"top[ _-]?p",),
    "release": (r"(?:come|comes|coming|came) out", r"be out", r"is out"),
    "multigpu": (
        r"multi(?:ple)?[ -]gpus?",
        r"(?:many|several|more|multiple|lots of|a lot of|(?:a )?bunch of|tons of|a few|\d+|two|eight)"
        r" (?:gpus|graphics cards|cards|a100s|h100s|nodes|machines|servers|computers)",
        r"across (?:the )?gpus",
        r"multi(?:ple)?[ -]nodes?",
        r"gpu (?:cluster|farm)s?",
    ),
    "selfcensor": (r"self[ -]censor(?:ed|ing|s|ship)?",),
    "refusal": (
        r"as an (?:ai|llm)(?: (?:language )?model| assistant)?",
        r"as a (?:large )?language model",
        r"i can ?not (?:answer|help|do|write)",
        r"i cant (?:answer|help|do|write)",
    ),
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
    "internals": (
        r"under the hood",
        r"how (?:does |do )?(?:it|rwkv|the model|they)(?: \w+ly)? works?(?: inside| internally)?",
        r"inner workings",
    ),
    "trainingcost": (r"(?:gpu|a100) hours", r"from scratch"),
    # How long a prompt may be is a question about the context length.
    "context length": (
        r"(?:prompts?|inputs?|messages?|conversations?|convos?) (?:length|size|limit)s?",
        r"how (?:long|big|large) (?:can|could|may|should|is|are) (?:a |an |my |the |your )?"
        r"(?:prompts?|inputs?|messages?|texts?)",
        r"how (?:many|much) (?:tokens|text) (?:can|could|does|will) "
        r"(?:it|rwkv|the model|a model|the bot|they|you|u)",
    ),
    "long context": (
        r"(?:long|longer|longest|big|bigger|huge|large|larger) "
        r"(?:prompts?|inputs?|texts?|documents?|docs|chats?|conversations?|convos?)",
    ),
    # What a model "was trained on" is its data, not how it was trained.
    "train dataset": (
        r"(?:trained|pretrained|tuned|finetuned|finetune)\s+(?:on|with)"
        r"(?!\s+(?:multigpu|single|one|two|a single|my|\d|gpus?|cpus?|nodes?|machines?|computers?|pcs?"
        r"|hardware|a100s?))",
    ),
    "single gpu": (
        r"(?:one|1|a single|single|my own) (?:gpus?|a100s?|h100s?|graphics cards?|machines?|computers?|pcs?)",
    ),
    # "How long until" is "when".
    "eta": (r"how (?:long|soon) (?:till|until|til|untill|before)",),
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
        "monetization",
        "monetisation",
        "profit",
        "startup",
        "startups",
        "paid",
        "revenue",
        "commercialize",
        "commercialise",
        "saas",
    ),
    "huggingface": ("hf",),
    "gpu": ("gpus", "graphics", "cards"),
    "next": ("nxt", "upcoming", "eta", "soon"),
    "operatingsystem": ("windows", "linux", "macos", "mac", "ubuntu", "os"),
    "download": ("link", "links", "url", "downloads", "downloading"),
    "context": ("ctx",),
    "length": ("len",),
    "limit": ("max", "maximum", "unlimited", "limitless", "endless"),
    "command": ("cmd", "cmds", "commands"),
    "temperature": ("temp",),
    "raccoon": ("racoon", "raccon", "racon"),
    "censor": (
        "uncensored",
        "censorship",
        "censord",
        "censured",
        "nsfw",
        "filter",
        "filters",
        "filtered",
        "filtering",
        "unfiltered",
        "woke",
        "moderated",
        "moderation",
        "safety",
        "aligned",
        "alignment",
        "restricted",
        "unrestricted",
        "restrictions",
        "jailbreak",
        "lewd",
        "spicy",
        "explicit",
        "erotic",
        "smut",
    ),
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
    "pretraining": ("pretrain", "pretrained"),
    "throughput": ("speed", "speeds", "fast", "faster", "fastest", "quicker"),
    "use": ("used", "using"),
    "reset": ("restart", "clear", "wipe"),
    "retry": ("regenerate", "regen", "reroll", "redo", "retries", "retrying"),
    "continue": ("continuation", "proceed"),
    "chat": ("conversation", "convo", "history"),
    "architecture": ("paper", "papers", "arch", "design", "rnn", "recurrent"),
    "page": ("docs", "doc", "documentation", "article", "writeup", "explainer", "blog"),
    "quality": ("performance", "worse", "degrade", "degrades", "degradation", "dumb", "dumber", "accuracy"),
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
currently right now today guess think work works part lot lots bunch ton tons
across through throughout via within without till until til during before after since while
past per toward towards around among against beyond upon
sometimes often always usually occasionally maybe perhaps probably exactly literally seriously
honestly generally overall mostly kinda sorta somehow anymore yet
happen happens happened happening mean means meant seem seems seemed good bad great nice cool
fine sure true false real big bigger small smaller large larger huge tiny little
come comes came try tried trying see look looking find found give gave
put take took takes taking
"""

# Words that say a question is about RWKV or this bot. A question naming another product is
# answered only when it also names one of these ("is chatgpt censored" gets no answer, "is rwkv
# censored like chatgpt" may).
DOMAIN_WORDS = frozenset(
    """
    rwkv bot bots model models raven raccoon racoon blinkdl wkv
    """.split()  # noqa: SIM905 (a word list reads better as text than as quoted strings)
)

# The domain words that name RWKV or this bot themselves. Beside another product's name, only
# these say the question is about RWKV: "model" in "is the claude model censored" is Claude's.
OWN_NAMES = DOMAIN_WORDS - {"model", "models"}

# Names of RWKV model families. Beside other words, they say which model a question is about more
# than what it asks ("is the raven model uncensored" asks about censorship); alone they still
# answer ("raccoon?"). "world" is one, though a question naming it is not thereby about RWKV.
MODEL_NAMES = frozenset(
    """
    raven world raccoon racoon
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
    python pytorch tensorflow ubuntu debian fedora windows macos mario pokemon
    """.split()  # noqa: SIM905 (a word list reads better as text than as quoted strings)
)
