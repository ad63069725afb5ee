#!/usr/bin/env python3
"""Builds the benchmark corpus: load-tests/data/realistic.txt and load-tests/data/long.txt.

Real, human-written English prose from offline sources on a Debian 12 (bookworm) machine:

  pydocs    Python 3.11 documentation, reST sources       apt: python3.11-doc   (PSF-2.0)
  pynews    Python 3.11 changelog entries (NEWS)          apt: python3.11-doc's python3.11 docs (PSF-2.0)
  debian    Debian bookworm main's AppStream (DEP-11) component descriptions, as `apt-get update`
            stores them in /var/lib/apt/lists (the projects' metainfo texts)
  fortunes  fortune cookie quotations, selected files      apt: fortunes         (BSD, see its copyright)
  wordnet   example sentences of WordNet 3.0 glosses      apt: wordnet-base     (WordNet 3.0 licence)

Sentences are cleaned of markup, filtered (no code, URLs, e-mail addresses, identifiers, lines
full of symbols) and never cut: a realistic.txt item is one sentence or a run of up to four
consecutive sentences of one paragraph (often a whole quotation or description paragraph); a
long.txt item is a run of consecutive sentences of one document section. The length distribution is shaped
by *selection* only (a truncated log-normal target histogram over token counts), with fixed
seeds, so the script is deterministic for the same inputs.

Token counts use the served model's tokenizer (all-MiniLM-L6-v2 WordPiece, [CLS]/[SEP]
included, no padding, no truncation).

Usage:  apt-get install python3.11-doc fortunes wordnet-base
        python3 -m pip install tokenizers pyyaml
        python3 load-tests/data/make_corpus.py [--tokenizer PATH] [--out load-tests/data]
"""

import argparse
import glob
import gzip
import html
import math
import os
import random
import re
import statistics
import sys
from collections import Counter, defaultdict

import yaml
from tokenizers import Tokenizer

PYDOCS = "/usr/share/doc/python3.11/html/_sources"
PYNEWS = "/usr/share/doc/python3.11/NEWS.gz"
DEP11 = "/var/lib/apt/lists/*_debian_dists_bookworm_main_dep11_Components-amd64.yml.gz"
FORTUNES = "/usr/share/games/fortunes"
FORTUNE_FILES = [
    "literature", "wisdom", "science", "people", "work", "education", "humorists", "fortunes",
    "food", "law", "medicine", "miscellaneous", "platitudes", "love", "politics", "sports",
    "pets", "kids", "computers", "cookie", "news", "magic", "paradoxum", "goedel",
]
WORDNET = "/usr/share/wordnet"

# realistic.txt: how many items, the share of each source, the target length distribution.
REALISTIC_ITEMS = 4000
REALISTIC_SHARES = {"pydocs": 0.34, "debian": 0.22, "fortunes": 0.18, "pynews": 0.12, "wordnet": 0.14}
MIN_TOKENS, MAX_TOKENS = 10, 128
LOGNORMAL_MEDIAN, LOGNORMAL_SIGMA = 32.0, 0.80
# long.txt: passages of consecutive sentences of one document.
LONG_ITEMS = 400
LONG_MIN, LONG_MAX = 200, 256
LONG_SHARES = {"pydocs": 0.75, "debian": 0.10, "fortunes": 0.15}

SEED = 20261201


# ---------------------------------------------------------------- cleaning and filtering

ABBREV = re.compile(r"\b(e\.g|i\.e|etc|vs|Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|No|cf|viz|approx|Fig|Inc|Ltd|Co|U\.S|a\.k\.a)\.$")
# after terminal punctuation (and a closing quote or bracket, kept with its sentence), before a
# capital, a digit or an opening quote or bracket
SPLIT = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(]?[A-Z0-9])")
BAD_SUBSTR = (
    "http", "www.", "://", ">>>", "::", "==", "->", "=>", "<-", "{", "}", "\\", "|", "$", "#",
    "@", "~", "`", "^", "&&", "||", ";;", "[x]", "...", "--", "__", "/*", "*/", "<", ">", " * ",
    " - ", "•",
)
DOTTED = re.compile(r"\b[A-Za-z][A-Za-z0-9]+\.[A-Za-z]|\b[A-Za-z]\.[A-Za-z]{2,}|\w:\w|^['\"][^'\"]+['\"]:")
CAMEL = re.compile(r"\b[a-z]+[A-Z]\w*\b")
SNAKE = re.compile(r"\w_\w")
CALL = re.compile(r"\w\(")
SYMBOLS = set("()[]{}<>=_*/\\|#$%^&~`;:+\"'")
WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")


def norm_space(s):
    s = s.replace("\u00ad", "")  # soft hyphens
    return re.sub(r"\s+", " ", s).strip()


def good_sentence(s, min_words=4):
    """Prose, not code: a capitalised sentence with terminal punctuation and few symbols."""
    if len(s) < 20 or len(s) > 2000:
        return False
    if not (s[0].isupper() or s[0] in "\"'(" or s[0].isdigit()):
        return False
    if not re.search(r"[.!?][\"')\]]?$", s):
        return False
    low = s.lower()
    if any(b in low for b in BAD_SUBSTR):
        return False
    if DOTTED.search(s):
        return False
    if CAMEL.search(s) or SNAKE.search(s) or CALL.search(s):
        return False
    words = WORD.findall(s)
    if len(words) < min_words:
        return False
    sym = sum(c in SYMBOLS for c in s)
    if sym > max(4, 0.04 * len(s)):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in s)
    if letters < 0.88 * len(s):
        return False
    # Mostly lowercase prose words, not headings or lists of names.
    upper_words = sum(w[0].isupper() for w in words)
    if len(words) >= 6 and upper_words > 0.5 * len(words):
        return False
    if any(ord(c) < 32 for c in s):
        return False
    if s.count("(") != s.count(")") or s.count('"') % 2:
        return False
    return True


def split_sentences(text):
    parts = SPLIT.split(text)
    out = []
    for p in parts:
        p = p.strip()
        if not p:
            continue
        if out and ABBREV.search(out[-1]):
            out[-1] = out[-1] + " " + p
        else:
            out.append(p)
    return out


# ---------------------------------------------------------------- sources
# Each source yields documents: lists of paragraphs, each a list of sentences (None marks a
# rejected sentence, which breaks runs of consecutive sentences).

ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")


def rst_inline(s):
    s = re.sub(r":(pep|rfc):`!?([^`<]*?)(?:\s*<[^>]*>)?`", lambda m: f"{m.group(1).upper()} {m.group(2).strip()}", s)
    s = ROLE.sub(lambda m: m.group(1).strip(), s)
    s = re.sub(r"``([^`]*)``", r"\1", s)
    s = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", s)
    s = re.sub(r"`([^`]*)`_*", r"\1", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"\1", s)
    s = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*(?!\w)", r"\1", s)
    s = re.sub(r"\[#\w*\]_|\[\d+\]_", "", s)
    s = re.sub(r"\|[\w-]+\|", "", s)
    s = re.sub(r"(\w)_+\b", r"\1", s)  # link references: Futurize_
    s = re.sub(r"\s+([.,;:!?])", r"\1", s)
    return norm_space(s)


def pydocs_documents():
    files = sorted(glob.glob(os.path.join(PYDOCS, "**", "*.rst.txt"), recursive=True))
    skip = ("c-api/", "includes/", "distutils/", "license", "copyright", "contents", "bugs")
    for path in files:
        rel = os.path.relpath(path, PYDOCS)
        if rel.startswith(skip) or "changelog" in rel:
            continue
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        paragraphs, block, literal_next, in_literal, literal_indent = [], [], False, False, 0
        section = []

        def flush():
            if block:
                text = norm_space(" ".join(block))
                section.append(text)
            block.clear()

        for line in lines:
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            if in_literal:
                if stripped and indent <= literal_indent:
                    in_literal = False
                else:
                    continue
            if not stripped:
                flush()
                if literal_next:
                    in_literal, literal_next = True, False
                continue
            # section underline / overline: a heading ends the current run of paragraphs
            if re.fullmatch(r"([=\-~^*#+\"'`.])\1{3,}", stripped):
                if block and len(block) == 1:
                    block.clear()
                flush()
                if section:
                    paragraphs.append(list(section))
                    section.clear()
                continue
            if stripped.startswith((".. ", ">>>", "...", "+-", "|")) or stripped == "..":
                flush()
                if stripped.startswith(".. ") and "::" in stripped:
                    # directive: its content is indented; prose directives (note, versionadded)
                    # are fine, code and index ones are not.
                    kind = stripped[3:].split("::")[0].strip()
                    if kind in ("code-block", "code", "sourcecode", "productionlist", "index",
                                "doctest", "testcode", "testoutput", "literalinclude", "highlight",
                                "csv-table", "list-table", "table", "toctree", "raw", "image",
                                "figure", "math", "only", "moduleauthor", "sectionauthor"):
                        in_literal, literal_indent = True, indent
                continue
            if re.match(r"^(\*|-|\d+\.|#\.)\s", stripped):
                flush()
                stripped = re.sub(r"^(\*|-|\d+\.|#\.)\s+", "", stripped)
            block.append(stripped)
            if stripped.endswith("::"):
                literal_next = True
                literal_indent = indent
                block[-1] = stripped[:-2] + ("" if stripped.endswith(" ::") else ":")
                flush()
        flush()
        if section:
            paragraphs.append(list(section))
        doc = []
        for sec in paragraphs:
            for para in sec:
                sents = [rst_inline(s) for s in split_sentences(rst_inline(para))]
                doc.append([s if good_sentence(s) else None for s in sents])
            doc.append([None])  # a section boundary breaks runs
        yield "pydocs", rel, doc


def pynews_documents():
    with gzip.open(PYNEWS, "rt", encoding="utf-8") as f:
        text = f.read()
    items = re.split(r"\n- ", text)
    for i, item in enumerate(items[1:]):
        item = item.split("\n\n")[0]
        item = re.sub(r"^(gh-issue|bpo|Issue #?)-?\d+:\s*", "", item.strip())
        item = rst_inline(item)
        sents = split_sentences(item)
        # "Patch by X." and similar credits are names, not prose.
        sents = [s for s in sents if not re.match(r"^(Patch|Original patch|Contributed|Initial patch|Based on)", s)]
        sents = [s if good_sentence(s) else None for s in sents]
        if sents:
            yield "pynews", f"NEWS#{i}", [sents]


def debian_documents():
    seen = set()
    for path in glob.glob(DEP11):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for comp in yaml.load_all(f, Loader=yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):
                if not isinstance(comp, dict) or "Description" not in comp:
                    continue
                desc = comp["Description"]
                body = desc.get("C") if isinstance(desc, dict) else None
                if not isinstance(body, str):
                    continue
                paras = re.findall(r"<(?:p|li)>(.*?)</(?:p|li)>", body, flags=re.S)
                doc = []
                for p in paras:
                    p = norm_space(html.unescape(re.sub(r"<[^>]+>", "", p)))
                    if p in seen:
                        continue
                    seen.add(p)
                    doc.append([s if good_sentence(s) else None for s in split_sentences(p)])
                if doc:
                    yield "debian", f"dep11:{comp.get('ID', '?')}", doc


def fortune_documents():
    seen = set()  # a few quotations appear in more than one file
    for name in FORTUNE_FILES:
        path = os.path.join(FORTUNES, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            entries = f.read().split("\n%\n")
        for i, e in enumerate(entries):
            lines = e.split("\n")
            # attribution lines ("-- Mark Twain") and anything after them are not the quote
            body = []
            for line in lines:
                if re.match(r"^\s*(--|—|~)\s*\S", line):
                    break
                body.append(line)
            text = norm_space(" ".join(body))
            if not text or text in seen or "\ufffd" in text or re.search(r"^\s*[A-Za-z]+:\s", text):
                continue  # repeats; dialogues, Q: / A: jokes
            seen.add(text)
            sents = split_sentences(text)
            ok = [s if good_sentence(s, min_words=2) else None for s in sents]
            yield "fortunes", f"{name}#{i}", [ok]


def wordnet_documents():
    seen = set()
    for pos in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(WORDNET, f"data.{pos}"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                gloss = line.split("|", 1)[1]
                for ex in re.findall(r'"([^"]+)"', gloss):
                    ex = norm_space(ex)
                    if ex in seen or len(ex.split()) < 6:
                        continue
                    seen.add(ex)
                    # WordNet examples are lower-case fragments; keep those that read as
                    # sentences, as written (a lower-case query is realistic too).
                    if not re.search(r"[.!?]$", ex):
                        continue
                    if good_sentence(ex[0].upper() + ex[1:]):
                        yield "wordnet", f"{pos}:{line[:8]}", [[ex]]


# ---------------------------------------------------------------- candidates and selection


class TokenCounter:
    def __init__(self, path):
        self.tok = Tokenizer.from_file(path)
        self.tok.no_padding()
        self.tok.no_truncation()
        self.cache = {}

    def __call__(self, text):
        n = self.cache.get(text)
        if n is None:
            n = len(self.tok.encode(text).ids)
            self.cache[text] = n
        return n

    def many(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for i in range(0, len(todo), 4096):
            chunk = todo[i : i + 4096]
            for t, e in zip(chunk, self.tok.encode_batch(chunk)):
                self.cache[t] = len(e.ids)


def load_documents():
    docs = []
    for gen in (pydocs_documents, pynews_documents, debian_documents, fortune_documents, wordnet_documents):
        n0 = len(docs)
        docs.extend(gen())
        print(f"  {gen.__name__}: {len(docs) - n0} documents", file=sys.stderr)
    return docs


def long_candidates(docs, count, rng):
    """Runs of consecutive good sentences of one document whose joined text is 200–256 tokens
    (each run aims at a random length in that range, so the lengths spread over it).
    Returns (source, text, sentence keys, tokens)."""
    out = []
    for source, name, doc in docs:
        if source not in LONG_SHARES:
            continue
        flat = []  # (key, sentence) with None as a break
        for pi, para in enumerate(doc):
            for si, s in enumerate(para):
                flat.append(None if s is None else ((name, pi, si), s))
        i = 0
        while i < len(flat):
            if flat[i] is None:
                i += 1
                continue
            j, toks, goal = i, 0, rng.randint(LONG_MIN, LONG_MAX - 12)
            while j < len(flat) and flat[j] is not None and toks < goal:
                toks += count(flat[j][1]) - 2 + (2 if j == i else 0)
                j += 1
            if toks < LONG_MIN:
                i = j + 1
                continue
            text = " ".join(s for _, s in flat[i:j])
            n = count(text)
            if LONG_MIN <= n <= LONG_MAX:
                out.append((source, text, [k for k, _ in flat[i:j]], n))
                i = j
            else:
                i += 1
    return out


def short_candidates(docs, count):
    """Single sentences and runs of up to four consecutive sentences of one paragraph, whole
    quotations and whole description paragraphs. Returns (source, text, sentence keys)."""
    out = []
    for source, name, doc in docs:
        for pi, para in enumerate(doc):
            n = len(para)
            for i in range(n):
                if para[i] is None:
                    continue
                for j in range(i + 1, min(n, i + 4) + 1):
                    if para[j - 1] is None:
                        break
                    text = " ".join(para[i:j])
                    keys = [(name, pi, k) for k in range(i, j)]
                    out.append((source, text, keys))
    count.many([t for _, t, _ in out])
    return [(s, t, k, count(t)) for s, t, k in out if MIN_TOKENS <= count(t) <= MAX_TOKENS]


def target_histogram(total):
    """Counts per token length: a log-normal (median, sigma) truncated to [MIN_TOKENS, MAX_TOKENS]."""
    mu = math.log(LOGNORMAL_MEDIAN)

    def cdf(x):
        return 0.5 * (1 + math.erf((math.log(x) - mu) / (LOGNORMAL_SIGMA * math.sqrt(2))))

    lo, hi = cdf(MIN_TOKENS - 0.5), cdf(MAX_TOKENS + 0.5)
    weights = {n: (cdf(n + 0.5) - cdf(n - 0.5)) / (hi - lo) for n in range(MIN_TOKENS, MAX_TOKENS + 1)}
    counts = {n: int(w * total) for n, w in weights.items()}
    # largest remainders so the counts add up
    rest = total - sum(counts.values())
    for n in sorted(weights, key=lambda n: weights[n] * total - counts[n], reverse=True)[:rest]:
        counts[n] += 1
    return counts


def fingerprint(text):
    """Equal for texts that differ only in case, punctuation or quote style."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def select(cands, hist, shares, used, rng):
    """Fills each length bin from the candidates of that length, keeping the sources near their
    shares and never using a source sentence twice. Bins that run short pass the deficit on to
    the neighbouring lengths. Long bins first: they are the scarce ones."""
    by_len = defaultdict(list)
    for c in cands:
        by_len[c[3]].append(c)
    for lst in by_len.values():
        rng.shuffle(lst)
    total = sum(hist.values())
    taken, per_source, texts = [], Counter(), set()
    carry = 0
    for n in sorted(hist, reverse=True):
        want = hist[n] + carry
        pool = defaultdict(list)
        for c in by_len.get(n, []):
            pool[c[0]].append(c)
        got = 0
        while got < want:
            # the source furthest below its share that still has candidates of this length
            order = sorted(
                (s for s in pool if pool[s]),
                key=lambda s: per_source[s] / max(1e-9, shares.get(s, 0) * total),
            )
            order = [s for s in order if shares.get(s, 0) > 0]
            if not order:
                break
            picked = False
            for s in order:
                while pool[s]:
                    c = pool[s].pop()
                    if fingerprint(c[1]) in texts or any(k in used for k in c[2]):
                        continue
                    taken.append(c)
                    texts.add(fingerprint(c[1]))
                    used.update(c[2])
                    per_source[s] += 1
                    got += 1
                    picked = True
                    break
                if picked:
                    break
            if not picked:
                break
        carry = want - got
    return taken, carry


def stats(lengths):
    s = sorted(lengths)
    p = lambda q: s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]  # noqa: E731
    return {
        "items": len(s),
        "min": s[0],
        "p10": p(10),
        "median": statistics.median(s),
        "mean": round(statistics.fmean(s), 1),
        "p90": p(90),
        "p99": p(99),
        "max": s[-1],
        "share_over_80": round(sum(x > 80 for x in s) / len(s), 3),
        "at_least_120": sum(x >= 120 for x in s),
    }


def write(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for text in items:
            assert "\n" not in text and text.strip() == text and text
            f.write(text + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_tok = next(iter(glob.glob(os.path.expanduser("~/.cache/kiln/models/all-minilm-l6-v2/*/tokenizer.json"))), None)
    ap.add_argument("--tokenizer", default=default_tok)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    if not args.tokenizer:
        sys.exit("no tokenizer.json: run `kiln fetch` first or pass --tokenizer")
    count = TokenCounter(args.tokenizer)
    rng = random.Random(SEED)

    print("reading sources", file=sys.stderr)
    docs = load_documents()

    # long.txt first, from whole documents; its sentences are then not reused in realistic.txt.
    used = set()
    longs = long_candidates(docs, count, rng)
    print(f"  long candidates: {Counter(c[0] for c in longs)}", file=sys.stderr)
    rng.shuffle(longs)
    long_sel, per_source = [], Counter()
    caps = {s: round(share * LONG_ITEMS) for s, share in LONG_SHARES.items()}
    for fill in (False, True):  # first up to each source's share, then anything left
        for c in longs:
            if len(long_sel) >= LONG_ITEMS:
                break
            if (not fill and per_source[c[0]] >= caps[c[0]]) or any(k in used for k in c[2]):
                continue
            if any(fingerprint(c[1]) == fingerprint(d[1]) for d in long_sel):
                continue
            long_sel.append(c)
            used.update(c[2])
            per_source[c[0]] += 1
    print(f"  long selected: {Counter(c[0] for c in long_sel)}", file=sys.stderr)

    shorts = short_candidates(docs, count)
    print(f"  realistic candidates: {Counter(c[0] for c in shorts)}", file=sys.stderr)
    hist = target_histogram(REALISTIC_ITEMS)
    real_sel, short_by = select(shorts, hist, REALISTIC_SHARES, used, rng)
    if short_by:
        print(f"  realistic: {short_by} items short of the target", file=sys.stderr)
    print(f"  realistic selected: {Counter(c[0] for c in real_sel)}", file=sys.stderr)

    rng.shuffle(real_sel)
    rng.shuffle(long_sel)
    write(os.path.join(args.out, "realistic.txt"), [c[1] for c in real_sel])
    write(os.path.join(args.out, "long.txt"), [c[1] for c in long_sel])
    for name, sel in (("realistic.txt", real_sel), ("long.txt", long_sel)):
        st = stats([c[3] for c in sel])
        src = Counter(c[0] for c in sel)
        print(f"{name}: {st}")
        for source in sorted(src):
            lengths = [c[3] for c in sel if c[0] == source]
            print(f"  {source}: {len(lengths)} items, mean {statistics.fmean(lengths):.1f} tokens")


if __name__ == "__main__":
    main()
