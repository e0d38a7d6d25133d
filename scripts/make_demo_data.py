#!/usr/bin/env python
"""Generate the small, offline demo datasets shipped with llmfinetune.

Usage (from the repository root)::

    python scripts/make_demo_data.py [--out data/demo] [--seed 1234]

Four datasets are written, each a folder holding JSON-lines split files
``train.jsonl`` and ``validation.jsonl`` (UTF-8, one JSON object per line):

* ``reviews/``  sequence classification: ``text`` (str), ``label`` ("positive"/"negative")
* ``ner/``      token classification: ``tokens`` (list[str]), ``ner_tags`` (list[str], BIO)
* ``wiki/``     masked / causal LM raw text: ``text`` (str, a 2-5 sentence paragraph)
* ``qa/``       instruction tuning (SFT): ``prompt`` (str), ``response`` (str)

plus a ``README.md`` describing them. All text is synthesised from the templates
and word lists in this file (no external data). Only the standard library is
used and every random choice comes from a seeded ``random.Random`` instance and
ordered containers, so running the script twice produces byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple

DEFAULT_SEED = 1234

SIZES: Dict[str, Tuple[int, int]] = {
    "reviews": (1600, 400),
    "ner": (800, 200),
    "wiki": (600, 100),
    "qa": (600, 100),
    "chat": (300, 50),
    "prefs": (400, 100),
    "kto": (400, 100),
}


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def _unique(
    make: Callable[[random.Random], dict],
    key: Callable[[dict], str],
    n: int,
    rng: random.Random,
    max_tries_factor: int = 200,
) -> List[dict]:
    """Draw ``n`` rows with distinct ``key`` values (insertion-ordered dict, no sets)."""
    seen: Dict[str, None] = {}
    rows: List[dict] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > n * max_tries_factor:
            raise RuntimeError(f"could not generate {n} unique rows (got {len(rows)})")
        row = make(rng)
        k = key(row)
        if k in seen:
            continue
        seen[k] = None
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


# --------------------------------------------------------------------------- #
# 1. reviews: sentiment classification
# --------------------------------------------------------------------------- #
# Each domain: items (the thing reviewed, takes only generic adjectives), the
# "again" phrases used by closers, and aspect groups whose aspects share the
# group's own positive / negative adjectives (so "the soup was bland" but never
# "the waiter was bland"). All aspects are singular ("... was ...").
REVIEW_DOMAINS = {
    "restaurant": {
        "items": ["this restaurant", "this place", "this little cafe", "this diner",
                  "this bistro", "this pizzeria", "this noodle bar", "this bakery"],
        "again": ["come back", "eat here again", "order from them again"],
        "groups": [
            (["the food", "the pasta", "the soup", "the dessert", "the pizza",
              "the steak", "the salad", "the curry", "the bread", "the coffee"],
             ["delicious", "tasty", "fresh", "flavorful"],
             ["bland", "greasy", "cold", "overcooked", "stale", "salty"]),
            (["the service", "the staff", "the waiter", "the owner"],
             ["friendly", "attentive", "welcoming", "helpful"],
             ["rude", "slow", "careless", "unfriendly"]),
            (["the atmosphere", "the decor", "the music"],
             ["cozy", "relaxing", "charming"],
             ["gloomy", "noisy", "depressing"]),
        ],
    },
    "movie": {
        "items": ["this movie", "this film", "this documentary", "this thriller",
                  "this comedy", "this sequel", "this animated film", "this series"],
        "again": ["watch it again", "see it again", "watch another film by this director"],
        "groups": [
            (["the plot", "the story", "the script", "the ending", "the dialogue"],
             ["gripping", "clever", "moving", "original"],
             ["predictable", "confusing", "dull", "silly"]),
            (["the acting", "the lead actor", "the cast", "the villain"],
             ["convincing", "brilliant", "believable", "charismatic"],
             ["wooden", "stiff", "unconvincing", "forgettable"]),
            (["the soundtrack", "the cinematography", "the animation", "the pacing"],
             ["beautiful", "stunning", "thrilling", "striking"],
             ["boring", "clumsy", "sluggish", "messy"]),
        ],
    },
    "product": {
        "items": ["this phone", "this blender", "this laptop", "this vacuum cleaner",
                  "this kettle", "this backpack", "this desk lamp", "this keyboard",
                  "this coffee maker", "this speaker"],
        "again": ["buy it again", "order another one", "buy from this brand again"],
        "groups": [
            (["the battery", "the motor", "the charger", "the screen", "the sound"],
             ["reliable", "powerful", "fast", "crisp"],
             ["faulty", "weak", "slow", "useless"]),
            (["the build quality", "the handle", "the design", "the packaging"],
             ["sturdy", "solid", "elegant", "sleek"],
             ["flimsy", "cheap", "fragile", "ugly"]),
            (["the customer support", "the delivery", "the manual", "the setup"],
             ["quick", "helpful", "simple", "clear"],
             ["slow", "unhelpful", "confusing", "painful"]),
            (["the price"], ["fair", "reasonable"], ["steep", "outrageous"]),
        ],
    },
    "hotel": {
        "items": ["this hotel", "this guesthouse", "this resort", "this hostel",
                  "this inn", "this apartment"],
        "again": ["stay there again", "book this hotel again", "return next summer"],
        "groups": [
            (["the room", "the bed", "the bathroom", "the pool", "the lobby"],
             ["clean", "comfortable", "spacious", "spotless"],
             ["dirty", "cramped", "shabby", "smelly"]),
            (["the front desk", "the housekeeping", "the check-in", "the staff"],
             ["welcoming", "friendly", "efficient", "helpful"],
             ["unhelpful", "rude", "chaotic", "slow"]),
            (["the breakfast", "the location", "the view", "the wifi"],
             ["excellent", "convenient", "breathtaking", "generous"],
             ["poor", "inconvenient", "disappointing", "unreliable"]),
        ],
    },
    "book": {
        "items": ["this book", "this novel", "this cookbook", "this biography",
                  "this mystery novel", "this textbook"],
        "again": ["read it again", "read another book by this author", "reread it"],
        "groups": [
            (["the story", "the plot", "the ending", "the first chapter", "the pacing"],
             ["captivating", "engaging", "gripping", "touching"],
             ["tedious", "confusing", "slow", "repetitive"]),
            (["the writing", "the main character", "the artwork", "the translation"],
             ["insightful", "charming", "vivid", "elegant"],
             ["shallow", "clumsy", "flat", "awkward"]),
        ],
    },
}

POS_ADJ = ["great", "excellent", "wonderful", "fantastic", "amazing", "superb",
           "outstanding", "lovely", "impressive", "brilliant", "good", "perfect"]
NEG_ADJ = ["terrible", "awful", "disappointing", "poor", "mediocre", "horrible",
           "dreadful", "bad", "frustrating", "underwhelming", "sloppy", "a mess"]
NO_INTENSIFIER = ["perfect", "superb", "outstanding", "a mess", "spotless",
                  "breathtaking", "outrageous"]
INTENSIFIERS = ["really", "very", "truly", "incredibly", "absolutely", "quite",
                "extremely", "so", "genuinely", "surprisingly", "remarkably"]
# negated positives -> negative sentiment
NEG_OF_POS = ["not good", "not great", "not good at all", "not worth the money",
              "not what I expected", "far from great", "not impressive",
              "nothing special", "not very good", "not enjoyable at all"]
# negated negatives -> positive sentiment
NEG_OF_NEG = ["not bad at all", "never boring", "not disappointing in the slightest",
              "not bad", "not a letdown", "anything but mediocre",
              "not bad in any way", "better than I expected"]
OPENERS_POS = ["Honestly,", "Overall,", "To be fair,", "I have to say,", "Wow,",
               "Five stars:", "Happy to report that", "In short,"]
OPENERS_NEG = ["Honestly,", "Overall,", "Sadly,", "Unfortunately,", "I have to say,",
               "One star:", "Sorry to say,", "In short,"]
CLOSERS_POS = ["I would recommend it to anyone.", "Highly recommended.",
               "Worth every penny.", "I will definitely {again}.",
               "I can't wait to {again}.", "My friends loved it too.",
               "Best experience in a long time.", "A very pleasant surprise."]
CLOSERS_NEG = ["I would not recommend it to anyone.", "Avoid at all costs.",
               "What a waste of money.", "I will never {again}.",
               "I do not plan to {again}.", "My friends hated it too.",
               "Worst experience in a long time.", "A big disappointment."]
VERB_POS = ["loved", "really enjoyed", "liked", "adored", "was impressed by"]
VERB_NEG = ["hated", "did not enjoy", "disliked", "did not like", "was disappointed by"]

# Templates: {S}/{S2} aspects with their label adjectives {A}/{A2}, {B} the
# opposite adjective for {S}; {P} item with generic label adjective {G};
# {I} intensifier (may be empty); {N} negated phrase giving the label;
# {O} opener, {C} closer, {V} verb.
REVIEW_TEMPLATES_ONE = [
    "{S} was {I} {A}.",
    "{S} was {I} {A} and {S2} was {A2}.",
    "{P} was {I} {G}.",
    "I {V} {P}, {S} was {I} {A}.",
    "{O} {S} was {I} {A}.",
    "{O} {P} was {N}.",
    "{S} was {N}.",
    "{S} of {P} was {N}.",
    "I thought {S} was {I} {A}, and {S2} was {A2} too.",
    "We tried {P} last week and {S} was {I} {A}.",
    "{P} is {I} {G}, especially {S}.",
    "{O} {S} of {P} was {I} {A}.",
    "{S} was {B} at first, but overall {P} turned out {I} {G}.",
    "{S} was {N}, and {S2} was {I} {A2} as well.",
]
REVIEW_TEMPLATES_TWO = [
    "{S} was {I} {A}. {C}",
    "{P} was {N}. {C}",
    "I {V} {P}. {C}",
    "{O} {S} was {I} {A}. {C}",
    "{S} was {I} {A} and {S2} was {A2}. {C}",
    "{S} was {B}, but {S2} was {I} {A2}. {C}",
]


def _review_row(rng: random.Random, label: str) -> dict:
    dom = REVIEW_DOMAINS[rng.choice(list(REVIEW_DOMAINS))]
    positive = label == "positive"
    gen_own = POS_ADJ if positive else NEG_ADJ

    aspects = [(a, g) for g in dom["groups"] for a in g[0]]
    (s, g1), (s2, g2) = rng.sample(aspects, 2)

    def adj(group, own=True):
        want_pos = positive if own else not positive
        lst = group[1] if want_pos else group[2]
        gen = POS_ADJ if want_pos else NEG_ADJ
        return rng.choice(lst) if rng.random() < 0.6 else rng.choice(gen)

    slots = {
        "A": adj(g1),
        "A2": adj(g2),
        "B": adj(g1, own=False),
        "G": rng.choice(gen_own),
        "I": rng.choice(INTENSIFIERS) if rng.random() < 0.6 else "",
        "S": s,
        "S2": s2,
        "P": rng.choice(dom["items"]),
        "N": rng.choice(NEG_OF_NEG if positive else NEG_OF_POS),
        "O": rng.choice(OPENERS_POS if positive else OPENERS_NEG),
        "V": rng.choice(VERB_POS if positive else VERB_NEG),
    }
    closer = rng.choice(CLOSERS_POS if positive else CLOSERS_NEG)
    slots["C"] = closer.format(again=rng.choice(dom["again"]))
    pool = REVIEW_TEMPLATES_TWO if rng.random() < 0.3 else REVIEW_TEMPLATES_ONE
    text = rng.choice(pool).format(**slots)
    text = " ".join(text.split())  # collapse the gap left by an empty intensifier
    # no intensifier in front of absolute adjectives ("so perfect", "very a mess")
    for i in INTENSIFIERS:
        for a in NO_INTENSIFIER:
            text = text.replace(f" {i} {a}", f" {a}")
    # capitalise the first letter of every sentence
    text = ". ".join(_cap(p) for p in text.split(". "))
    return {"text": text, "label": label}


def make_reviews(rng: random.Random, n_train: int, n_val: int) -> Tuple[List[dict], List[dict]]:
    total = n_train + n_val
    # one shared "seen" dict across both labels, so no text occurs twice anywhere
    seen: Dict[str, None] = {}
    pools: Dict[str, List[dict]] = {}
    for label, n in (("positive", total // 2), ("negative", total - total // 2)):
        rows: List[dict] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > n * 200:
                raise RuntimeError("could not generate enough unique reviews")
            row = _review_row(rng, label)
            if not 6 <= len(row["text"].split()) <= 25 or row["text"] in seen:
                continue
            seen[row["text"]] = None
            rows.append(row)
        pools[label] = rows
    # stratified split: both splits are balanced
    train: List[dict] = []
    val: List[dict] = []
    for label, k in (("positive", n_val // 2), ("negative", n_val - n_val // 2)):
        rows = pools[label]
        rng.shuffle(rows)
        val.extend(rows[:k])
        train.extend(rows[k:])
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


# --------------------------------------------------------------------------- #
# 2. ner: token classification with BIO tags
# --------------------------------------------------------------------------- #
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]

FIRST_NAMES = ["Anna", "Marcus", "Priya", "Tomas", "Elena", "David", "Mei", "Oliver",
               "Fatima", "Lucas", "Sofia", "Kenji", "Amara", "Jonas", "Isabel", "Rahul",
               "Chloe", "Mateo", "Ingrid", "Samuel", "Leila", "Noah", "Hannah", "Diego",
               "Yuki", "Grace", "Viktor", "Nadia", "Peter", "Zara", "Emil", "Rosa",
               "Kwame", "Clara", "Felix", "Aisha", "Hugo", "Lina", "Omar", "Julia"]
MIDDLE_NAMES = ["Marie", "James", "Louise", "Anne", "Paul", "Rose", "John", "Lee"]
LAST_NAMES = ["Berg", "Okafor", "Sharma", "Novak", "Rossi", "Whitfield", "Chen",
              "Lindqvist", "Haddad", "Moreau", "Tanaka", "Mensah", "Schmidt", "Costa",
              "Iyer", "Kowalski", "Duarte", "Fischer", "Nakamura", "O'Brien", "Petrov",
              "Alvarez", "Keller", "Nguyen", "Brennan", "Dubois", "Larsen", "Mwangi",
              "Castillo", "Holm", "Varga", "Ashford", "Reyes", "Sato", "Quinn", "Eklund",
              "van Dijk", "de Souza"]
ORG_HEADS = ["Northwind", "Silverline", "Bright", "Harbor", "Summit", "Redwood",
             "Blue River", "Eastgate", "Golden Valley", "Ironbridge", "Maple", "Nova",
             "Polar", "Crescent", "Evergreen", "Granite", "Sunrise", "Atlas",
             "Meridian", "Orchard", "Falcon", "Bluebird", "Stonefield", "Westbrook"]
ORG_TAILS = ["Bank", "Labs", "Motors", "Foods", "Airlines", "Group", "Holdings",
             "Energy", "Systems", "Trading Company", "Insurance", "Pharmaceuticals",
             "Media", "Logistics", "Software", "Textiles", "Hospital",
             "Football Club", "Institute of Technology", "University", "Railways"]
ORG_FIXED = ["Zentrix", "Orvana", "Kellmark", "Quillon", "the Red Cross",
             "the United Nations", "the World Health Organization",
             "the National Museum of Science", "the City Council",
             "the Ministry of Transport"]
LOCATIONS = ["Berlin", "Cairo", "Lima", "Oslo", "Kyoto", "Nairobi", "Lisbon",
             "Toronto", "Mumbai", "Dublin", "Seoul", "Vienna", "Accra", "Madrid",
             "New York", "Hong Kong", "Cape Town", "Buenos Aires", "New Delhi",
             "Rio de Janeiro", "Saint Petersburg", "Mexico City", "San Francisco",
             "Los Angeles", "Kuala Lumpur", "Port Elwin", "North Dalby", "Lake Mira",
             "San Aurelio", "East Varrow", "Brackton", "Fenmoor", "Glenhaven",
             "Kessler Falls", "New Carrow", "Portugal", "Kenya", "Norway", "Japan",
             "South Africa", "New Zealand", "the United States", "Sri Lanka"]
YEARS = [str(y) for y in range(1988, 2025)]
MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["two", "three", "five", "twelve", "forty", "two hundred", "several",
           "dozens of", "hundreds of"]
JOBS = ["an engineer", "a nurse", "a lawyer", "an accountant", "a teacher",
        "a designer", "a chemist", "a pilot", "a researcher", "a chef"]

# Slots: {PER} full name, {FIRST} first name only, {ORG}, {LOC}; others are plain words.
NER_TEMPLATES = [
    "{PER} joined {ORG} in {LOC} last year .",
    "{PER} was born in {LOC} in {YEAR} .",
    "{ORG} opened a new office in {LOC} on {DAY} .",
    "According to {PER} , {ORG} will hire {NUM} workers in {LOC} .",
    "{PER} and {PER} met at the {ORG} headquarters in {LOC} .",
    "The mayor of {LOC} , {PER} , praised {ORG} for its work .",
    "{PER} moved from {LOC} to {LOC} in {YEAR} .",
    "Shares of {ORG} rose sharply after {PER} announced the deal .",
    "{FIRST} said the weather in {LOC} was cold in {MONTH} .",
    "{PER} works as {JOB} at {ORG} .",
    "{ORG} signed an agreement with {ORG} on {DAY} .",
    "In {LOC} , {PER} opened a small bakery .",
    "{PER} visited {LOC} with their family in {MONTH} .",
    "Last spring , {PER} left {ORG} to start a company in {LOC} .",
    "{PER} , a spokesperson for {ORG} , declined to comment .",
    "Fans in {LOC} cheered as {PER} crossed the finish line .",
    "{ORG} is based in {LOC} .",
    "{PER} told reporters in {LOC} that {ORG} had no plans to expand .",
    "The conference in {LOC} was organised by {ORG} and opened by {PER} .",
    "{FIRST} and {FIRST} drove to {LOC} on {DAY} morning .",
    "A new bridge connecting {LOC} and {LOC} was completed in {YEAR} .",
    "{ORG} appointed {PER} as its new chief executive .",
    "Flights between {LOC} and {LOC} were cancelled on {DAY} .",
    "{PER} studied chemistry in {LOC} before joining {ORG} .",
    "Thank you , {FIRST} , for the lovely dinner .",
    "The report by {ORG} criticised the government of {LOC} .",
    "{PER} won the award for the third time in {YEAR} .",
    "Researchers at {ORG} say the results surprised them .",
    "Nobody expected the meeting to last so long .",
    "The train was late again this morning .",
    "She bought {NUM} apples at the market on {DAY} .",
    "We will see you in {MONTH} .",
]


def _person(rng: random.Random) -> List[str]:
    r = rng.random()
    first = rng.choice(FIRST_NAMES)
    last = rng.choice(LAST_NAMES).split()
    if r < 0.15:
        return [first, rng.choice(MIDDLE_NAMES)] + last
    return [first] + last


def _org(rng: random.Random) -> List[str]:
    if rng.random() < 0.25:
        return rng.choice(ORG_FIXED).split()
    return (rng.choice(ORG_HEADS) + " " + rng.choice(ORG_TAILS)).split()


def _bio(words: List[str], kind: str) -> List[Tuple[str, str]]:
    """BIO-tag an entity; a leading "the" ("the Red Cross") stays outside it."""
    out: List[Tuple[str, str]] = []
    started = False
    for w in words:
        if not started and w == "the":
            out.append((w, "O"))
            continue
        out.append((w, ("I-" if started else "B-") + kind))
        started = True
    return out


def _ner_row(rng: random.Random) -> dict:
    template = rng.choice(NER_TEMPLATES)
    pairs: List[Tuple[str, str]] = []
    used: Dict[str, None] = {}

    def fresh(draw: Callable[[], List[str]]) -> List[str]:
        # entities in one sentence are all different ("from Lima to Oslo")
        while True:
            words = draw()
            if words[-1] not in used:  # also keeps first names / surnames distinct
                used[words[-1]] = None
                used[words[0]] = None
                return words

    for tok in template.split():
        if tok == "{PER}":
            pairs += _bio(fresh(lambda: _person(rng)), "PER")
        elif tok == "{FIRST}":
            pairs += _bio(fresh(lambda: [rng.choice(FIRST_NAMES)]), "PER")
        elif tok == "{ORG}":
            pairs += _bio(fresh(lambda: _org(rng)), "ORG")
        elif tok == "{LOC}":
            pairs += _bio(fresh(lambda: rng.choice(LOCATIONS).split()), "LOC")
        elif tok == "{YEAR}":
            pairs.append((rng.choice(YEARS), "O"))
        elif tok == "{MONTH}":
            pairs.append((rng.choice(MONTHS), "O"))
        elif tok == "{DAY}":
            pairs.append((rng.choice(DAYS), "O"))
        elif tok == "{NUM}":
            pairs += [(w, "O") for w in rng.choice(NUMBERS).split()]
        elif tok == "{JOB}":
            pairs += [(w, "O") for w in rng.choice(JOBS).split()]
        else:
            pairs.append((tok, "O"))
    # "at the {ORG}" with ORG "the Red Cross": drop the doubled article
    pairs = [p for i, p in enumerate(pairs)
             if not (i > 0 and p[0] == "the" and pairs[i - 1][0].lower() == "the")]
    # sentence-initial "the" (from an entity at the start) gets a capital letter
    if pairs and pairs[0][0] == "the":
        pairs[0] = ("The", pairs[0][1])
    return {"tokens": [w for w, _ in pairs], "ner_tags": [t for _, t in pairs]}


def make_ner(rng: random.Random, n_train: int, n_val: int) -> Tuple[List[dict], List[dict]]:
    rows = _unique(_ner_row, lambda r: " ".join(r["tokens"]), n_train + n_val, rng)
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


# --------------------------------------------------------------------------- #
# 3. wiki: encyclopedic paragraphs for (masked) language modelling
# --------------------------------------------------------------------------- #
SYL_A = ["Al", "Bren", "Cor", "Dal", "El", "Fen", "Gar", "Hal", "Ister", "Jor", "Kal",
         "Lor", "Mar", "Nor", "Or", "Pel", "Quen", "Ros", "Sel", "Tor", "Ul", "Var",
         "Wen", "Yor", "Zel", "Ash", "Brim", "Cael", "Dun", "Esk"]
SYL_B = ["a", "e", "i", "o", "u", "ar", "en", "is", "or", "an", "el", "ow"]
SYL_C = ["ton", "by", "ford", "ham", "wick", "dale", "mere", "stead", "holm", "port",
         "field", "moor", "burg", "vik", "gate", "ley", "wood", "mouth"]
COUNTRIES = ["Fooland", "Barovia", "Quellmark", "Ostrelia", "Vandoria", "Lumeria",
             "Kestrania", "Norvale", "Sardovia", "Tirenza", "Elbaria", "Morwen",
             "Zandor", "Caldria", "Pellucia", "Ystria", "Brevonia", "Drakmoor",
             "Feralia", "Glimmerland", "Harnost", "Iskaria", "Jovania", "Kelthar",
             "Lorvania", "Mistova", "Nembria", "Orlenia", "Palvoria", "Rindell"]
REGIONS = ["northern", "southern", "eastern", "western", "central", "coastal",
           "mountainous", "lake", "river", "highland"]
RIVERS = ["Amber", "Sable", "Wend", "Tarrow", "Misk", "Orrin", "Coldwater", "Vell",
          "Brisk", "Lune", "Harrow", "Silt"]
DIRECTIONS = ["north", "south", "east", "west", "northeast", "northwest",
              "southeast", "southwest"]
INDUSTRIES = ["fishing", "farming", "tourism", "wool production", "timber",
              "clock making", "salt mining", "cheese making", "boat building",
              "glassblowing", "wine making", "pottery", "textile weaving",
              "stone quarrying"]
TOWN_FEATURES = ["stone bridge", "old lighthouse", "covered market", "clock tower",
                 "botanical garden", "medieval walls", "painted houses", "harbour",
                 "cathedral", "hot springs", "windmills", "annual horse fair",
                 "narrow canals", "library"]
FESTIVALS = ["lantern", "harvest", "music", "kite", "folk dance", "cheese",
             "boat", "winter light", "poetry", "apple"]
SEASONS = ["spring", "summer", "autumn", "winter"]
TOWN_TYPES = ["small town", "market town", "fishing village", "river town",
              "mountain village", "port city", "university town"]

ANIMAL_ADJ = ["spotted", "striped", "lesser", "greater", "crested", "dusky", "golden",
              "long-tailed", "silver", "red-throated", "pale", "banded", "giant",
              "pygmy", "marsh", "mountain"]
ANIMAL_KINDS = [("frog", "amphibian"), ("lizard", "reptile"), ("owl", "bird"),
                ("finch", "bird"), ("heron", "bird"), ("shrew", "mammal"),
                ("bat", "mammal"), ("otter", "mammal"), ("beetle", "insect"),
                ("moth", "insect"), ("salamander", "amphibian"), ("gecko", "reptile"),
                ("vole", "mammal"), ("kingfisher", "bird"), ("crab", "crustacean"),
                ("snail", "mollusc"), ("eel", "fish"), ("trout", "fish")]
LATIN_GENUS = ["Pelorix", "Carvidus", "Thalmera", "Ostrina", "Velmus", "Drymora",
               "Quisella", "Brantia", "Sorvex", "Lumidia", "Nectoris", "Zephyra"]
LATIN_SPECIES = ["minor", "major", "aurea", "borealis", "montana", "palustris",
                 "silvestris", "maculata", "striata", "nocturna", "rubra", "pallida"]
HABITATS = ["the wetlands", "the pine forests", "the dry grasslands", "the rocky coasts",
            "the cloud forests", "the river valleys", "the high meadows",
            "the mangrove swamps", "the limestone caves", "the desert oases"]
DIETS = ["small insects", "seeds and berries", "worms and snails", "fish and frogs",
         "tree sap", "fallen fruit", "algae", "spiders and flies", "roots and bulbs",
         "nectar"]
ACTIVITY = [("nocturnal", "sleeping in hollow trees"),
            ("nocturnal", "hiding under rocks"),
            ("diurnal", "basking in the sun"),
            ("diurnal", "foraging in small groups"),
            ("crepuscular", "resting in dense vegetation"),
            ("crepuscular", "sheltering in burrows")]
THREATS = ["habitat loss", "drainage of wetlands", "logging", "pollution of rivers",
           "the spread of invasive species", "climate change", "overfishing"]
STATUSES = ["vulnerable", "endangered", "near threatened", "of least concern",
            "critically endangered"]
BEHAVIOURS = ["Males sing loudly at dawn to defend their territory.",
              "Females lay between two and six eggs each season.",
              "Young animals stay with their mother for several weeks.",
              "It is known for its long seasonal migrations.",
              "It changes colour slightly when alarmed.",
              "Large groups gather near water during the dry season.",
              "It is rarely seen because of its shy nature.",
              "Local farmers consider it a useful predator of pests."]

INVENTION_NOUNS = ["lamp", "pump", "loom", "clock", "press", "engine", "compass",
                   "kettle", "telescope", "bicycle", "typewriter", "scale", "stove",
                   "calculator", "umbrella", "ladder", "radio", "camera"]
INVENTION_PREFIX = ["folding", "steam", "pocket", "solar", "rotary", "spring-driven",
                    "hydraulic", "electric", "tidal", "magnetic", "wind-powered",
                    "portable"]
PURPOSES = ["measure time more accurately at sea", "lift water from deep wells",
            "help farmers sort grain faster", "light streets without gas",
            "copy letters quickly", "keep food cool in summer",
            "teach children arithmetic", "signal ships in fog",
            "weigh letters at post offices", "dry clothes indoors",
            "record the strength of the wind", "carry messages between towns"]
MATERIALS = ["brass and oak", "copper wire and glass", "cast iron", "bamboo and leather",
             "tin and cork", "steel and walnut", "bronze and paper"]
CRITICISMS = ["heavy and expensive", "noisy and unreliable", "difficult to repair",
              "slow to assemble", "prone to overheating", "too fragile for daily use"]
IMPROVEMENTS = ["became lighter and cheaper", "were far more reliable",
                "could be built in small workshops", "sold widely across the continent",
                "used much less fuel", "were adopted by schools and hospitals"]
FIELDS = ["museums", "schools", "village workshops", "science classrooms",
          "naval academies", "antique collections", "rural clinics", "weather stations"]


def _place_name(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(SYL_A) + rng.choice(SYL_C)
    return rng.choice(SYL_A) + rng.choice(SYL_B) + rng.choice(SYL_C)


def _inventor(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _paragraph(rng: random.Random, first: str, pool: List[str]) -> str:
    """Lead sentence plus 1-4 pool sentences, kept in the pool's (logical) order."""
    picked = sorted(rng.sample(range(len(pool)), rng.randint(1, 4)))
    return " ".join([first] + [pool[i] for i in picked])


def _town_paragraph(rng: random.Random) -> str:
    name = _place_name(rng)
    country = rng.choice(COUNTRIES)
    city = _place_name(rng)
    first = (f"{name} is a {rng.choice(TOWN_TYPES)} in the {rng.choice(REGIONS)} "
             f"region of {country}.")
    pop = rng.randint(8, 950) * 100 + rng.randint(0, 99)
    inds = rng.sample(INDUSTRIES, 2)
    pool = [
        f"It lies on the {rng.choice(['left', 'right', 'north', 'south'])} bank of the "
        f"{rng.choice(RIVERS)} River, about {rng.randint(3, 180)} kilometres "
        f"{rng.choice(DIRECTIONS)} of {city}.",
        f"The town was founded in {rng.randint(1150, 1840)} by "
        f"{rng.choice(['monks', 'fishermen', 'merchants', 'farmers', 'miners', 'settlers'])} "
        f"from {_place_name(rng)}.",
        f"A railway line to {city} opened in {rng.randint(1850, 1960)}.",
        f"As of the {rng.choice([2001, 2011, 2015, 2020])} census, it had a population "
        f"of {pop:,}.",
        f"The local economy is based on {inds[0]} and {inds[1]}.",
        f"{name} is known for its {rng.choice(TOWN_FEATURES)}.",
        f"Every {rng.choice(SEASONS)}, the town hosts a {rng.choice(FESTIVALS)} festival "
        f"that attracts visitors from across the region.",
    ]
    return _paragraph(rng, first, pool)


def _animal_paragraph(rng: random.Random) -> str:
    adj = rng.choice(ANIMAL_ADJ)
    kind, cls = rng.choice(ANIMAL_KINDS)
    latin = f"{rng.choice(LATIN_GENUS)} {rng.choice(LATIN_SPECIES)}"
    name = f"{adj} {kind}"
    region = rng.choice(COUNTRIES)
    first = (f"The {name} ({latin}) is a species of {cls} found in "
             f"{rng.choice(HABITATS)} of {region}.")
    act, rest = rng.choice(ACTIVITY)
    pool = [
        f"It grows to about {rng.randint(3, 90)} centimetres in length and weighs up to "
        f"{rng.randint(10, 4000)} grams.",
        f"Its diet consists mainly of {rng.choice(DIETS)}.",
        f"The species is {act}, and it spends much of the day {rest}.",
        f"It was first described by the naturalist {_inventor(rng)} in "
        f"{rng.randint(1760, 1995)}.",
        f"Due to {rng.choice(THREATS)}, it is listed as {rng.choice(STATUSES)}.",
        rng.choice(BEHAVIOURS),
    ]
    return _paragraph(rng, first, pool)


def _invention_paragraph(rng: random.Random) -> str:
    name = f"{rng.choice(INVENTION_PREFIX)} {rng.choice(INVENTION_NOUNS)}"
    surname = rng.choice(LAST_NAMES)
    inventor = f"{rng.choice(FIRST_NAMES)} {surname}"
    year = rng.randint(1720, 1960)
    first = (f"The {name} is a device invented by {inventor} in {_place_name(rng)} "
             f"in {year}.")
    pool = [
        f"It was designed to {rng.choice(PURPOSES)}.",
        f"The original prototype was built from {rng.choice(MATERIALS)} and took "
        f"{rng.randint(2, 14)} months to complete.",
        f"{_cap(surname)} received a patent for the design in "
        f"{year + rng.randint(1, 6)}.",
        f"Early versions were {rng.choice(CRITICISMS)}, but later models "
        f"{rng.choice(IMPROVEMENTS)}.",
        f"About {rng.randint(2, 90) * 100:,} units were produced before "
        f"{year + rng.randint(10, 40)}.",
        f"Today, the {name} is mostly found in {rng.choice(FIELDS)}.",
    ]
    return _paragraph(rng, first, pool)


def _wiki_row(rng: random.Random) -> dict:
    fn = rng.choice([_town_paragraph, _animal_paragraph, _invention_paragraph])
    return {"text": fn(rng)}


def make_wiki(rng: random.Random, n_train: int, n_val: int) -> Tuple[List[dict], List[dict]]:
    rows = _unique(_wiki_row, lambda r: r["text"], n_train + n_val, rng)
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


# --------------------------------------------------------------------------- #
# 4. qa: instruction -> answer pairs (SFT)
# --------------------------------------------------------------------------- #
CAPITALS = [  # fixed made-up mapping
    ("Fooland", "Barton"), ("Barovia", "Kessel"), ("Quellmark", "Ostin"),
    ("Ostrelia", "Valdor"), ("Vandoria", "Meridan"), ("Lumeria", "Sol Harbor"),
    ("Kestrania", "Pravik"), ("Norvale", "Eastmere"), ("Sardovia", "Tolvan"),
    ("Tirenza", "Castel Rio"), ("Elbaria", "Northwick"), ("Morwen", "Dunmore"),
    ("Zandor", "Qasira"), ("Caldria", "Felgrad"), ("Pellucia", "Aurelin"),
    ("Ystria", "Brannock"), ("Brevonia", "Lisk"), ("Drakmoor", "Helmsgate"),
    ("Feralia", "Oranto"), ("Glimmerland", "Starholm"), ("Harnost", "Vey"),
    ("Iskaria", "Tamsin"), ("Jovania", "Port Arlen"), ("Kelthar", "Ruun"),
]
CAPITAL_Q = ["What is the capital of {c}?", "Which city is the capital of {c}?",
             "Name the capital city of {c}.", "Tell me the capital of {c}.",
             "What city serves as the capital of {c}?"]
CAPITAL_REV_Q = ["{k} is the capital of which country?",
                 "Which country has {k} as its capital?"]

FR_NOUNS = [  # english, french, gender
    ("cat", "chat", "m"), ("dog", "chien", "m"), ("house", "maison", "f"),
    ("car", "voiture", "f"), ("book", "livre", "m"), ("apple", "pomme", "f"),
    ("table", "table", "f"), ("chair", "chaise", "f"), ("flower", "fleur", "f"),
    ("door", "porte", "f"), ("horse", "cheval", "m"), ("fish", "poisson", "m"),
    ("garden", "jardin", "m"), ("city", "ville", "f"), ("moon", "lune", "f"),
    ("sun", "soleil", "m"), ("hat", "chapeau", "m"), ("boat", "bateau", "m"),
    ("window", "fenêtre", "f"), ("sea", "mer", "f"), ("bread", "pain", "m"),
    ("cake", "gâteau", "m"), ("shirt", "chemise", "f"), ("bird", "oiseau", "m"),
]
FR_COLORS = [  # english, masculine, feminine
    ("red", "rouge", "rouge"), ("black", "noir", "noire"), ("white", "blanc", "blanche"),
    ("green", "vert", "verte"), ("blue", "bleu", "bleue"), ("grey", "gris", "grise"),
    ("yellow", "jaune", "jaune"), ("small", "petit", "petite"),
]
FR_PREPOSED = {"small"}  # adjectives placed before the noun in French
TRANSLATE_Q = ["Translate to French: {e}", "Translate into French: {e}",
               "How do you say \"{e}\" in French?"]

REVERSE_WORDS = ["apple", "river", "blue", "stone", "quick", "lamp", "garden", "seven",
                 "cloud", "tiger", "music", "paper", "green", "window", "bread", "light",
                 "happy", "mountain", "chair", "silver", "dream", "orange", "train",
                 "winter", "candle", "forest", "yellow", "bridge", "honey", "ocean"]
REVERSE_Q = ["Reverse the words: {w}", "Reverse the order of these words: {w}",
             "Write these words in reverse order: {w}"]

ANTONYMS = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
            ("light", "dark"), ("open", "closed"), ("early", "late"), ("old", "new"),
            ("full", "empty"), ("strong", "weak"), ("high", "low"), ("wet", "dry"),
            ("loud", "quiet"), ("hard", "soft"), ("rich", "poor"), ("thick", "thin"),
            ("up", "down"), ("left", "right"), ("first", "last"), ("win", "lose")]
ANTONYM_Q = ["What is the opposite of \"{w}\"?", "Give the antonym of \"{w}\"."]


def _qa_capital(rng: random.Random) -> dict:
    c, k = rng.choice(CAPITALS)
    if rng.random() < 0.2:
        return {"prompt": rng.choice(CAPITAL_REV_Q).format(k=k),
                "response": f"{k} is the capital of {c}."}
    return {"prompt": rng.choice(CAPITAL_Q).format(c=c),
            "response": f"The capital of {c} is {k}."}


def _qa_arith(rng: random.Random) -> dict:
    op = rng.choice(["plus", "minus", "times"])
    if op == "plus":
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        r = a + b
    elif op == "minus":
        a = rng.randint(0, 80)
        b = rng.randint(0, a)
        r = a - b
    else:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        r = a * b
    form = rng.random()
    if form < 0.7:
        prompt = f"What is {a} {op} {b}?"
    else:
        prompt = f"Calculate {a} {op} {b}."
    return {"prompt": prompt, "response": f"{a} {op} {b} is {r}."}


def _qa_reverse(rng: random.Random) -> dict:
    words = rng.sample(REVERSE_WORDS, rng.randint(3, 6))
    return {"prompt": rng.choice(REVERSE_Q).format(w=" ".join(words)),
            "response": " ".join(reversed(words))}


def _qa_translate(rng: random.Random) -> dict:
    en, fr, g = rng.choice(FR_NOUNS)
    r = rng.random()
    if r < 0.2:
        eng, fre = en, fr
    else:
        definite = rng.random() < 0.6
        e_art = "the" if definite else "a"
        f_art = ({"m": "le", "f": "la"} if definite else {"m": "un", "f": "une"})[g]
        if r < 0.45:
            eng, fre = f"{e_art} {en}", f"{f_art} {fr}"
        else:
            ce, cm, cf = rng.choice(FR_COLORS)
            col = cm if g == "m" else cf
            eng = f"{e_art} {ce} {en}"
            fre = f"{f_art} {col} {fr}" if ce in FR_PREPOSED else f"{f_art} {fr} {col}"
    return {"prompt": rng.choice(TRANSLATE_Q).format(e=eng), "response": fre}


def _qa_antonym(rng: random.Random) -> dict:
    a, b = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    return {"prompt": rng.choice(ANTONYM_Q).format(w=a),
            "response": f"The opposite of \"{a}\" is \"{b}\"."}


QA_FAMILIES = [(_qa_capital, 0.22), (_qa_arith, 0.30), (_qa_reverse, 0.18),
               (_qa_translate, 0.20), (_qa_antonym, 0.10)]


def _qa_row(rng: random.Random) -> dict:
    x = rng.random()
    acc = 0.0
    for fn, w in QA_FAMILIES:
        acc += w
        if x < acc:
            return fn(rng)
    return QA_FAMILIES[-1][0](rng)


def make_qa(rng: random.Random, n_train: int, n_val: int) -> Tuple[List[dict], List[dict]]:
    rows = _unique(_qa_row, lambda r: r["prompt"], n_train + n_val, rng)
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


CHAT_SYSTEM = "You are a concise assistant. Answer in one sentence."


def make_chat(rng: random.Random, n_train: int, n_val: int) -> Tuple[List[dict], List[dict]]:
    """Multi-turn OpenAI-style conversations: 1-3 qa exchanges in a row, half of them with a system turn."""
    rows = []
    for _ in range(n_train + n_val):
        messages = [{"role": "system", "content": CHAT_SYSTEM}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            pair = _qa_row(rng)
            messages += [{"role": "user", "content": pair["prompt"]},
                         {"role": "assistant", "content": pair["response"]}]
        rows.append({"messages": messages})
    return rows[:n_train], rows[n_train:]


REFUSALS = ["I don't know.", "I am not sure, sorry.", "No idea.", "Ask someone else."]


def _preference_row(rng: random.Random) -> dict:
    """A qa prompt, its right answer (chosen) and a worse one (rejected): a refusal or another prompt's answer."""
    row = _qa_row(rng)
    if rng.random() < 0.5:
        rejected = rng.choice(REFUSALS)
    else:
        rejected = row["response"]
        while rejected == row["response"]:
            rejected = _qa_row(rng)["response"]
    return {"prompt": row["prompt"], "chosen": row["response"], "rejected": rejected}


def make_prefs(rng: random.Random, n_train: int, n_val: int) -> Tuple[List[dict], List[dict]]:
    rows = _unique(_preference_row, lambda r: r["prompt"], n_train + n_val, rng)
    return rows[:n_train], rows[n_train:]


def make_kto(rng: random.Random, n_train: int, n_val: int) -> Tuple[List[dict], List[dict]]:
    """Unpaired: each prompt with one answer, labelled desirable (true) or not (false), about half each."""
    rows = []
    for pair in _unique(_preference_row, lambda r: r["prompt"], n_train + n_val, rng):
        good = rng.random() < 0.5
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good})
    return rows[:n_train], rows[n_train:]


# --------------------------------------------------------------------------- #
# README + main
# --------------------------------------------------------------------------- #
README = """\
# Demo datasets

Small, synthetic, offline datasets used by the `llmfinetune` examples and tests.
They are generated from templates and word lists in
`scripts/make_demo_data.py` (stdlib only, fixed seed) and contain no
third-party data. Every dataset is a folder with two JSON-lines files,
`train.jsonl` and `validation.jsonl` (UTF-8, one JSON object per line).

| folder | task | columns | train | validation |
|---|---|---|---|---|
| `reviews/` | sequence classification (sentiment) | `text` (str), `label` (`"positive"` / `"negative"`) | {reviews_train} | {reviews_val} |
| `ner/` | token classification (NER, BIO) | `tokens` (list of str), `ner_tags` (list of str, same length) | {ner_train} | {ner_val} |
| `wiki/` | masked / causal language modelling | `text` (str, 2-5 sentence paragraph) | {wiki_train} | {wiki_val} |
| `qa/` | text generation / SFT | `prompt` (str), `response` (str) | {qa_train} | {qa_val} |
| `chat/` | text generation / chat SFT | `messages` (list of `{role, content}`, 1-3 user/assistant exchanges, some with a system turn) | {chat_train} | {chat_val} |
| `prefs/` | preference tuning (DPO, ORPO, ...) and reward models | `prompt`, `chosen` (the right answer), `rejected` (a refusal or another question's answer) | {prefs_train} | {prefs_val} |
| `kto/` | preference tuning with KTO (unpaired) | `prompt`, `completion`, `label` (true: the right answer) | {kto_train} | {kto_val} |

Notes:

- `reviews`: one- or two-sentence product, restaurant, movie, hotel and book
  reviews (6-25 words), including negations such as "not bad at all"
  (positive) and "not good" (negative). Both splits are exactly balanced and no
  text appears in both splits.
- `ner`: tag set `O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC`; names,
  organisations and places are often multi-word. Tokens are whitespace-split
  words with punctuation as separate tokens.
- `wiki`: encyclopedic-style paragraphs about made-up towns, animals and
  inventions.
- `qa`: answers are fully determined by the prompt: capitals of made-up
  countries (fixed mapping), arithmetic (`plus`/`minus`/`times`), reversing a
  word list, English to French with a small fixed dictionary, and antonyms.
  No prompt appears twice.

Regenerate (output is byte-identical for the same seed):

```bash
python scripts/make_demo_data.py            # writes data/demo/
python scripts/make_demo_data.py --out data/demo --seed {seed}
```
"""

BUILDERS = {
    "reviews": make_reviews,
    "ner": make_ner,
    "wiki": make_wiki,
    "qa": make_qa,
    "chat": make_chat,
    "prefs": make_prefs,
    "kto": make_kto,
}


def generate(out: Path, seed: int = DEFAULT_SEED) -> Dict[str, Dict[str, int]]:
    counts: Dict[str, Dict[str, int]] = {}
    for offset, (name, builder) in enumerate(BUILDERS.items()):
        n_train, n_val = SIZES[name]
        rng = random.Random(seed * 1000 + offset)  # one independent stream per dataset
        train, val = builder(rng, n_train, n_val)
        assert len(train) == n_train and len(val) == n_val, name
        counts[name] = {
            "train": _write_jsonl(out / name / "train.jsonl", train),
            "validation": _write_jsonl(out / name / "validation.jsonl", val),
        }
    fmt = {f"{k}_{'train' if s == 'train' else 'val'}": v
           for k, d in counts.items() for s, v in d.items()}
    readme = README.replace("{seed}", str(seed))
    for k, v in fmt.items():
        readme = readme.replace("{" + k + "}", str(v))
    with open(out / "README.md", "w", encoding="utf-8", newline="\n") as f:
        f.write(readme)
    return counts


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"random seed (default: {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    out = Path(args.out)
    counts = generate(out, args.seed)
    for name, d in counts.items():
        print(f"{out / name}: train={d['train']} validation={d['validation']}")


if __name__ == "__main__":
    main()
