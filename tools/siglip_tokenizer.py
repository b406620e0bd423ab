#!/usr/bin/env python3
"""SigLIP's text tokenizer for rsclip: a tiny SentencePiece model for the test fixture, and a
converter from a SigLIP ``spiece.model`` to a Hugging Face ``tokenizer.json`` whose
``encode(text).ids`` are what ``transformers.SiglipTokenizer`` gives with
``padding="max_length", truncation=True, max_length=...``.

    train_tiny_spm(out_path, vocab_size=512)         deterministic unigram model, SigLIP's layout
    tokenizer_json_from_spm(spm_path, max_length=64) tokenizer.json text; normalization, Unigram,
                                                     "</s>", truncation and padding are all inside
    python tools/siglip_tokenizer.py --check         train, convert, compare with SiglipTokenizer

What SiglipTokenizer (transformers 5.24) does
---------------------------------------------
1. ``tokenize()`` replaces every "▁" in the text by a space and puts one "▁" in front.
2. The text is cut at the special tokens "</s>" and "<unk>" (exact and case-sensitive, before
   lowercasing; "<pad>" is not special, SigLIP pads with "</s>").
3. Each piece between them is canonicalized on its own: ``lower()`` (with Python's final-sigma
   rule), ASCII punctuation deleted, runs of ``re``'s ``\\s`` (Unicode whitespace, including
   U+001C..U+001F and U+0085) made one space, ``strip()``.
4. Each piece becomes ``sp.encode("<unk>" + piece)[len(sp.encode("<unk>")):]``, a trick to encode
   without SentencePiece's dummy "▁" prefix.  Its consequences:
   * the nmt_nfkc charsmap turns "▁" into a space, so the "▁" of step 1 is just a leading space,
     which SentencePiece drops: the first piece is encoded like ``sp.encode(piece)``, dummy "▁"
     included, and leading whitespace never matters (" hello" == "hello");
   * a piece after a special token gets no "▁" prefix, but keeps one "▁" when its first
     character normalizes to a space (U+200B, or "¨" -> " \\u0308");
   * ">" is not in a vocabulary trained without punctuation, so it is unknown, and SentencePiece
     fuses it with the unknown characters that follow into one piece, which the slice then cuts
     off whole: a piece after a special token *loses its leading run of unknown characters*
     ("</s>中x" -> [</s>, x]); a leading U+0338 goes too, composed with ">" into "≯".
   The check meant to drop a leading lone "▁" before a special token never fires.
5. "</s>" is appended unless the ids already end with it, then padding/truncation.  Pad and eos
   both being id 1, the result is always ``(ids[:max_length - 1] + [1])`` padded with 1s.

How the tokenizer.json reproduces it
------------------------------------
* It cannot cut at special tokens first and still treat the first piece differently, so it
  normalizes the whole text: "</s>" and "<unk>" become two sentinels (noncharacters U+FDD0 and
  U+FDD1; the same characters in the input first become another unknown one, which changes no
  ids), regex replacements do steps 3-4 around them, and the two tokens are added as
  *normalized* special tokens whose normalized form is the sentinel.
* The whitespace and punctuation classes are enumerated from the running Python; the final-sigma
  rule is a regex whose "cased" and "case-ignorable" classes are read off Python's own
  ``lower()``; characters that Rust's Lowercase maps differently from Python (newer Unicode) are
  either provably harmless (both results just unknown characters) or protected by placeholders.
* SentencePiece applies its charsmap in one scan, longest rule first.  ``normalizers.Precompiled``
  instead looks up whole grapheme clusters, applies the *shortest* matching rule to all of it
  and drops the rest ("ａ\\u0301" -> "a", SentencePiece "á"), and cannot compose clusters of 6
  bytes or more (Hangul jamo, "e" + three accents).  So: a breaker (U+001C, deleted by the
  charsmap, always a cluster boundary) isolates every non-ASCII character, making Precompiled a
  per-character map; NFC then redoes the compositions of the multi-character rules (all "base
  variant + marks in canonical order" -> NFKC), with a blocker (U+FDD3) between any two
  characters that no rule has side by side, so NFC composes and reorders nothing else; the few
  rules for scripts newer than the NFC tables of the tokenizers crate (Unicode 9) are replayed
  literally.  Checked against ``SentencePieceProcessor.normalize`` on every code point, every
  rule (alone and followed by a mark) and half a million random strings: identical.
* Unknown characters all become one spare unknown character (no id changes; the Unigram model
  can then never spell "<pad>" out of a fullwidth "＜pad＞"), and control pieces get scores below
  any spelling of them with normal pieces, since SentencePiece never matches them in text.
* "▁" is prepended to the first piece when it is not empty; the Metaspace pre-tokenizer turns
  spaces into "▁" and splits, so each word is segmented on its own (no piece has an inner "▁").
* The post-processor appends "</s>"; truncation and padding (pad id 1, "</s>") are set inside.

Also checked once, outside this file, with the Rust crate the extension uses (tokenizers 0.22.2
with the project's Cargo.lock): the same ids as the Python binding on all --check strings and
sweeps.

Known differences
-----------------
None with the tiny model: ``--check`` (the listed cases, 20000 seeded fuzz strings, and every
code point in four contexts) finds none.  Latent ones, for other vocabularies or versions:

* If the vocabulary has pieces starting with ">" longer than ">" (say ">>"; not the tiny model,
  where ">" is unknown), a piece after a special token that starts with text completing one
  (only possible through compatibility characters like "＞", ASCII punctuation being gone) loses
  that text in SiglipTokenizer: the slice cuts the joined piece.  Not reproduced; the converter
  warns when the vocabulary has such pieces.
* SentencePiece adds Viterbi scores in float32, the Unigram model in float64: a near tie between
  two segmentations could go either way.  None seen with the tiny model.
* Unicode versions: Python's tables (14.0 here) against Rust's (17.0 for both the Python binding
  and rustc 1.95) are handled where they differ (lowercasing, whitespace, the charsmap's newer
  compositions), as probed when converting; a consumer built with a Rust of other Unicode
  tables than the binding's could lowercase a newly cased letter differently.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import random
import re
import string
import struct
import sys
import tempfile
import unicodedata
import warnings
from pathlib import Path

SPIECE_UNDERLINE = "\u2581"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
CORPUS_SEED = 20261125
CORPUS_SIZE = 800

# --------------------------------------------------------------------------------------------
# Tiny SentencePiece model
# --------------------------------------------------------------------------------------------

_COUNTS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many",
           "a few", "dozens of", "some", "2", "3", "4", "5", "6", "7", "8", "9", "10", "12", "15", "20",
           "24", "36", "40", "100"]
_THINGS = ["airplanes", "planes", "jets", "aircraft", "ships", "boats", "yachts", "storage tanks", "oil tanks",
           "cars", "trucks", "buses", "buildings", "houses", "trees", "containers", "cranes", "tennis courts",
           "swimming pools", "baseball diamonds", "greenhouses", "solar panels", "wind turbines", "silos",
           "fishing boats", "barges", "helicopters", "tankers", "warehouses", "villas", "tractors",
           "combine harvesters", "haystacks", "cattle", "sheep", "excavators", "bulldozers", "trains", "wagons",
           "freight cars", "sailboats", "kayaks", "cruise ships", "ferries", "gliders", "drones", "tents",
           "huts", "barns", "chimneys", "cooling towers", "pylons", "antennas", "billboards", "fountains",
           "statues", "tombs", "shipping containers", "gas holders", "water towers", "lorries", "vans",
           "motorbikes", "bicycles", "caravans", "pickups", "taxis", "jeeps"]
_ADJECTIVES = ["dense", "sparse", "green", "brown", "flooded", "dry", "irrigated", "circular", "rectangular",
               "large", "small", "white", "grey", "gray", "dark", "bright", "curved", "straight", "narrow",
               "wide", "muddy", "frozen", "snowy", "sandy", "rocky", "lush", "yellow", "orange", "quiet", "busy",
               "huge", "tiny", "abandoned", "terraced", "fenced", "paved", "unpaved", "crowded", "empty",
               "modern", "historic", "coastal", "inland", "rural", "urban", "suburban", "elevated", "sunken",
               "square", "triangular", "oval", "winding", "polluted", "clear", "turquoise", "emerald",
               "reddish", "bluish", "ploughed", "harvested", "fallow", "overgrown", "burnt", "eroded", "marshy",
               "hilly", "flat", "steep", "shallow", "deep", "tidal", "seasonal"]
_PLACES = ["airport", "runway", "terminal", "apron", "harbour", "harbor", "port", "pier", "dock", "marina",
           "quay", "jetty", "river", "lake", "pond", "reservoir", "dam", "forest", "woodland", "farmland",
           "meadow", "pasture", "orchard", "vineyard", "desert", "beach", "coastline", "bay", "island",
           "residential area", "industrial area", "commercial area", "stadium", "parking lot", "railway station",
           "highway", "road", "intersection", "roundabout", "bridge", "viaduct", "church", "school", "campus",
           "wetland", "mountain", "glacier", "quarry", "mine", "oxbow lake", "canal", "golf course", "park",
           "playground", "square", "freeway", "overpass", "rice paddy", "maize field", "wheat field", "zone",
           "suburb", "village", "town", "city centre", "downtown", "kiln", "refinery", "power plant",
           "cemetery", "hospital", "prison", "military base", "container terminal", "shipyard", "lighthouse",
           "breakwater", "sandbar", "delta", "estuary", "lagoon", "mangrove", "savanna", "steppe", "tundra",
           "plateau", "valley", "canyon", "cliff", "ridge", "volcano", "crater", "salt pan", "sewage plant",
           "landfill", "junkyard", "sports field", "race track", "water park", "ferry terminal", "helipad",
           "motorway junction", "toll plaza", "train yard", "rail depot", "logistics hub", "shopping mall",
           "apartment complex", "housing estate", "trailer park", "farmstead", "barnyard", "fish farm",
           "aquaculture pond", "irrigation canal", "center pivot field", "tea plantation", "palm plantation",
           "cornfield", "sugarcane field", "olive grove", "pine forest", "birch forest", "jungle", "swamp",
           "floodplain", "riverbank", "waterfront", "boardwalk", "promenade", "quayside", "dry dock"]
_PREPOSITIONS = ["next to", "near", "beside", "along", "around", "inside", "across", "behind", "in front of",
                 "on the edge of", "close to", "between", "surrounded by", "north of", "south of", "east of",
                 "west of"]
_VERBS = ["are parked at", "are parked in", "are docked at", "are moored in", "lie in", "stand in",
          "are scattered around", "are lined up along", "are located near", "sit beside",
          "are arranged in rows at", "are queued at", "are waiting near", "are heading towards",
          "are anchored off", "are clustered around", "are visible beside", "occupy", "surround", "cover",
          "overlook", "border", "cross", "flank", "encircle"]
_OPENINGS = ["an aerial view of", "a satellite image of", "a remote sensing image of", "an overhead photo of",
             "this image shows", "there is", "we can see", "a top down view of", "a high resolution image of",
             "a picture of", "an image showing"]
_CIRCUMSTANCES = ["", "", "", " after heavy rain", " in winter", " in summer", " at noon", " with long shadows",
                  " under thin clouds", " during the harvest", " at low tide", " after the flood", " at dusk",
                  " seen from above", " in the morning", " in autumn", " in spring", " after a storm",
                  " during a drought", " on a hazy day", " with a jagged shoreline", " beneath scattered cumulus",
                  " photographed by a drone", " captured by a satellite", " at sunrise",
                  " at night with street lights", " next to a zigzag path", " beside a quarry pit",
                  " bordered by hedgerows", " crossed by power lines", " with a helicopter landing pad",
                  " near an exhibition hall", " with vivid colours", " with faded colors"]


def _captions(n: int = CORPUS_SIZE, seed: int = CORPUS_SEED) -> list[str]:
    """Remote-sensing captions from a seeded generator (the tiny model's training corpus)."""
    r = random.Random(seed)
    pick = r.choice

    def a(words: str) -> str:
        return ("an " if words[0] in "aeiou" else "a ") + words

    forms = [
        lambda: f"{pick(_OPENINGS)} {a(pick(_ADJECTIVES) + ' ' + pick(_PLACES))}{pick(_CIRCUMSTANCES)}",
        lambda: f"{pick(_COUNTS)} {pick(_THINGS)} {pick(_VERBS)} {a(pick(_PLACES))}",
        lambda: f"{a(pick(_PLACES))} {pick(_PREPOSITIONS)} {a(pick(_ADJECTIVES) + ' ' + pick(_PLACES))}",
        lambda: (f"{pick(_OPENINGS)} {pick(_COUNTS)} {pick(_ADJECTIVES)} {pick(_THINGS)} {pick(_PREPOSITIONS)} "
                 f"the {pick(_PLACES)}{pick(_CIRCUMSTANCES)}"),
        lambda: f"{pick(_ADJECTIVES)} {pick(_PLACES)} with {pick(_COUNTS)} {pick(_THINGS)}",
        lambda: (f"many {pick(_ADJECTIVES)} {pick(_THINGS)} are {pick(_PREPOSITIONS)} {a(pick(_PLACES))}, "
                 f"and {a(pick(_PLACES))} is {pick(_PREPOSITIONS)} it"),
    ]
    out = []
    for _ in range(n):
        s = pick(forms)()
        if r.random() < 0.3:
            s = s[0].upper() + s[1:]
        if r.random() < 0.5:
            s += "."
        out.append(s)
    return out


def _siglip_canonical(text: str) -> str:
    """SiglipTokenizer.canonicalize_text: what its SentencePiece model ever gets to see."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def train_tiny_spm(out_path: str, vocab_size: int = 512) -> None:
    """Train a small unigram SentencePiece model laid out like SigLIP's spiece.model.

    pad=0 "<pad>", eos=1 "</s>", unk=2 "<unk>", no bos; nmt_nfkc normalizer, dummy prefix,
    whitespace cleanup, whitespace/script/number splitting as in SentencePiece's defaults.
    The output is byte-identical from run to run (checked by --check) for a given sentencepiece
    version.  The corpus is small: vocab_size can go up to about 520.
    """
    import sentencepiece as spm

    # Train on what SiglipTokenizer feeds the model (lowercase, no ASCII punctuation): capitals
    # and punctuation would only waste the small vocabulary.  This also keeps "<" and ">" out of
    # the vocabulary, like unknown characters in general (see the module docstring, step 4).
    sentences = [_siglip_canonical(c) for c in _captions()]
    spm.set_random_generator_seed(CORPUS_SEED)  # unused by these settings; pinned all the same
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # An iterator and a writer keep temp file names out of the model's trainer_spec.
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        # A tiny corpus: 0.9995 (the default) could drop a rare letter such as "z".
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        split_by_whitespace=True,
        split_by_unicode_script=True,
        split_by_number=True,
        byte_fallback=False,
        pad_id=PAD_ID, pad_piece="<pad>",
        eos_id=EOS_ID, eos_piece="</s>",
        unk_id=UNK_ID, unk_piece="<unk>",
        bos_id=-1,
        # Determinism: one thread (EM sums in a fixed order), every sentence, no shuffling.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    Path(out_path).write_bytes(model.getvalue())


# --------------------------------------------------------------------------------------------
# spiece.model -> tokenizer.json
# --------------------------------------------------------------------------------------------

def _load_model_proto(spm_path: str):
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    return proto, model_pb2


class _Charsmap:
    """SentencePiece's precompiled charsmap: a darts-clone double array whose leaves point into
    a pool of NUL-terminated replacement strings.  Read here to know which rules exist."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.units: tuple[int, ...] = ()
        self.pool = b""
        if blob:
            (trie_bytes,) = struct.unpack_from("<I", blob, 0)
            self.units = struct.unpack_from(f"<{trie_bytes // 4}I", blob, 4)
            self.pool = blob[4 + trie_bytes:]

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def _replacement(self, pos: int) -> str:
        start = self.units[pos] & 0x7FFFFFFF
        return self.pool[start:self.pool.index(b"\0", start)].decode("utf-8")

    def rules(self) -> dict[str, str]:
        """Every rule, key -> replacement.  The double array stores no child lists: a child of
        the node at ``pos`` is any unit at ``pos ^ byte`` whose label is that byte.  So every
        labelled unit is filed under ``index ^ label`` first, then the walk from the root only
        follows positions it actually reaches (for those, the filing is exactly darts' check)."""
        units, out = self.units, {}
        if not units:
            return out
        children: dict[int, list[int]] = {}
        for index, unit in enumerate(units):
            label = unit & 0x800000FF  # value units have bit 31 set: never a child
            if 0 < label < 0x100:
                children.setdefault(index ^ label, []).append(index)
        stack = [(self._offset(units[0]), b"")]
        while stack:
            pos, key = stack.pop()
            for child in children.get(pos, ()):
                unit = units[child]
                next_pos = child ^ self._offset(unit)
                next_key = key + bytes((unit & 0xFF,))
                if unit & 0x100:  # has a leaf: next_key is a rule
                    out[next_key.decode("utf-8")] = self._replacement(next_pos)
                stack.append((next_pos, next_key))
        return out


def _all_characters() -> str:
    return "".join(chr(c) for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000)


def _python_whitespace() -> list[str]:
    """The characters ``re``'s ``\\s`` matches in a str pattern (Unicode-aware), from the
    running Python, whose tables SiglipTokenizer uses.  ``strip()`` must remove the same ones."""
    everything = _all_characters()
    ws = re.findall(r"\s", everything)
    if ws != [c for c in everything if c.isspace()]:
        raise AssertionError("re's \\s and str.isspace() disagree; strip() would need its own rule")
    return ws


def _char_class(chars, negate: bool = False) -> str:
    """An Oniguruma character class with every character written as \\x{...} (ranges merged)."""
    cps = sorted({ord(c) for c in chars})
    parts, i = [], 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\x{{{cps[i]:X}}}" + (f"-\\x{{{cps[j]:X}}}" if j > i else ""))
        i = j + 1
    return "[" + ("^" if negate else "") + "".join(parts) + "]"


def tokenizer_json_from_spm(spm_path: str, max_length: int = 64) -> str:
    """JSON text of a `tokenizers` tokenizer whose ``encode(text).ids`` equal
    ``SiglipTokenizer(vocab_file=spm_path)(text, padding="max_length", truncation=True,
    max_length=max_length)["input_ids"]`` (how: module docstring).

    Raises ValueError for SentencePiece models unlike SigLIP's (not unigram, byte fallback,
    user-defined pieces, other special ids, no nmt_nfkc-like charsmap); warns where the
    vocabulary allows one of the latent differences listed in the module docstring."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if max_length < 1:
        raise ValueError("max_length must be at least 1 (room for </s>)")
    proto, model_pb2 = _load_model_proto(spm_path)
    Piece = model_pb2.ModelProto.SentencePiece
    norm = proto.normalizer_spec
    trainer = proto.trainer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]

    # Only what SigLIP's spiece.model uses is supported; anything else would need more rules.
    if trainer.model_type != model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError("only unigram SentencePiece models are supported")
    if trainer.byte_fallback or any(t in (Piece.USER_DEFINED, Piece.BYTE) for _, _, t in pieces):
        raise ValueError("byte fallback and user-defined pieces are not supported")
    if not (norm.add_dummy_prefix and norm.remove_extra_whitespaces and norm.escape_whitespaces) \
            or trainer.treat_whitespace_as_suffix or norm.normalization_rule_tsv:
        raise ValueError("expected SentencePiece's default whitespace handling (as in SigLIP)")
    special = {"</s>": EOS_ID, "<unk>": UNK_ID}
    for content, wanted in special.items():
        if pieces[wanted][0] != content:
            raise ValueError(f"expected {content!r} at id {wanted}, found {pieces[wanted][0]!r}")
    if pieces[UNK_ID][2] != Piece.UNKNOWN:
        raise ValueError("id 2 must be the unknown piece")

    normal = [p for p, _, t in pieces if t == Piece.NORMAL]
    # Characters with a piece of their own; any other character is "unknown" to SentencePiece
    # (a lattice position without a one-character piece gets an unk node).
    known = {p for p in normal if len(p) == 1}
    if SPIECE_UNDERLINE not in known:
        raise ValueError('the vocabulary has no "▁" piece')
    for p in normal:
        if SPIECE_UNDERLINE in p[1:]:
            raise ValueError(f"piece {p!r} has an inner '▁': words could not be encoded separately")
        if not set(p) <= known:
            raise ValueError(f"piece {p!r} uses a character that has no piece of its own")
    known_text = (known - {SPIECE_UNDERLINE}) | {" "}  # the normalizer works with spaces, not "▁"

    rules = _Charsmap(norm.precompiled_charsmap).rules()
    for key, r in rules.items():
        # The whitespace steps below assume a replacement never holds two spaces in a row, other
        # whitespace or "▁", and that "▁" becomes a space (true for nmt_nfkc).
        if "  " in r or SPIECE_UNDERLINE in r or any(c.isspace() and c != " " for c in r):
            raise ValueError(f"unexpected charsmap rule {key!r} -> {r!r}")
    if rules.get(SPIECE_UNDERLINE) != " ":  # what makes step 1's "▁" a mere leading space
        raise ValueError('expected a charsmap (nmt_nfkc, as in SigLIP) that turns "▁" into a space')

    whitespace = _python_whitespace()
    # Private characters for the normalized text: noncharacters that SigLIP treats as ordinary
    # unknown characters (no piece, untouched by lower(), punctuation removal, the charsmap and
    # NFC), so that mapping one to another in the input never changes the ids.
    rule_starts = {k[0] for k in rules}
    free = [c for c in map(chr, range(0xFDD0, 0xFDF0))
            if c not in known and c.lower() == c and not c.isspace() and unicodedata.combining(c) == 0
            and unicodedata.normalize("NFC", c) == c and c not in rule_starts
            and not any(c in p for p, _, _ in pieces)]
    eos_mark, unk_mark, spare, blocker = free[:4]

    def inert(c: str) -> bool:
        """Whether c is, wherever it stands, just one more unknown character to SentencePiece
        (so that replacing it by another such character cannot change any ids)."""
        out = rules.get(c, c)
        return (len(out) == 1 and out not in known_text and c not in known_text and not c.isspace()
                and c not in string.punctuation and c not in rule_chars and out not in rule_chars
                and unicodedata.combining(out) == 0 and out not in composing)

    rule_chars = {c for k in rules if len(k) > 1 for c in k}
    composing = _composition_seconds(rules)
    marks_class = _char_class(eos_mark + unk_mark)

    steps = [
        # Our private characters in the input become another unknown one: same ids.
        normalizers.Replace(Regex(_char_class(free)), spare),
        # SiglipTokenizer.tokenize: "▁" -> " " before anything else (also before the split).
        normalizers.Replace(SPIECE_UNDERLINE, " "),
        # The special tokens, exact and case-sensitive, before lowercasing.
        normalizers.Replace("</s>", eos_mark),
        normalizers.Replace("<unk>", unk_mark),
        # canonicalize_text, per piece between special tokens (the sentinels, neither cased nor
        # case-ignorable, end the context of lower()'s final-sigma rule just like a piece end).
        *_lowercase_steps(normalizers, Regex, free[4:], inert),
        normalizers.Replace(Regex(_char_class(string.punctuation)), ""),
        normalizers.Replace(Regex(_char_class(whitespace) + "+"), " "),
        normalizers.Replace(Regex(" (?=" + marks_class + ")"), ""),
        normalizers.Replace(Regex("(?<=" + marks_class + ") "), ""),
        normalizers.Strip(left=True, right=True),  # only " " is whitespace by now
    ]
    steps += _charsmap_steps(normalizers, Regex, norm.precompiled_charsmap, rules, composing, blocker, whitespace)
    # SentencePiece's own whitespace handling, per piece: runs of spaces (some made by the
    # charsmap) collapse; trailing ones go; leading ones go for the first piece only (a later
    # piece keeps one, as the "<unk>" prefix stands before it).
    steps += [
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(Regex(" (?=" + marks_class + ")"), ""),
        normalizers.Strip(left=True, right=True),
    ]
    # What the unk-prefix trick slices off the start of a piece after a special token: the
    # token holding the prefix's ">" (module docstring, step 4).  Unknown, ">" fuses with the
    # unknown characters after it; a leading U+0338 composes with it first.
    unknown = _char_class(known_text | {eos_mark, unk_mark}, negate=True)
    cut = []
    if ">\u0338" in rules:
        cut.append("\\x{338}" + ("" if rules[">\u0338"] in known else unknown + "*"))
    if ">" not in known:
        cut.append(unknown + "+")
    elif any(p.startswith(">") and len(p) > 1 for p in normal):
        warnings.warn("pieces starting with '>' can join the unk prefix to the text after a special "
                      "token; SiglipTokenizer's slicing of such cases is not reproduced")
    if cut:
        steps.append(normalizers.Replace(Regex(f"(?<={marks_class})(?:{'|'.join(cut)})"), ""))
    # Every unknown character becomes the same spare one: no id changes (unknown characters are
    # never part of a normal piece), but no control piece can be spelled with them any more.
    steps.append(normalizers.Replace(Regex(unknown), spare))
    steps += [
        # The first piece's dummy "▁" (none if that piece is empty).
        normalizers.Prepend(SPIECE_UNDERLINE),
        normalizers.Replace(Regex("\\A" + SPIECE_UNDERLINE + "(?=" + marks_class + ")"), ""),
    ]

    # SentencePiece never matches control (or unused) pieces in text, the Unigram model does
    # (think of a fullwidth "＜pad＞" after NFKC, in a vocabulary that has "<" and ">").  Their
    # scores, which SentencePiece never uses, are lowered below any spelling of them with normal
    # pieces.  The unknown score follows the minimum down, which changes no segmentation: all
    # segmentations of a text hold the same unknown characters, each in its own unk node.
    lowest = min(s for _, s, t in pieces if t == Piece.NORMAL)
    never = (Piece.CONTROL, Piece.UNKNOWN, Piece.UNUSED)
    vocab = [(p, len(p) * lowest - 100.0 if t in never else s) for p, s, t in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(steps)
    # Spaces become "▁" and words are encoded one by one ("▁" only ever starts a piece).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always", split=True)
    # normalized=True: matched in the normalized text, where they are the sentinels.
    tok.add_special_tokens([AddedToken(content, special=True, normalized=True) for content in special])
    for content, wanted in special.items():
        mark = eos_mark if wanted == EOS_ID else unk_mark
        if tok.token_to_id(content) != wanted or tok.normalizer.normalize_str(content) != mark:
            raise AssertionError(f"special token {content!r} is not set up as expected")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=EOS_ID, pad_token="</s>")
    return tok.to_str()


def _lowercase_steps(normalizers, Regex, placeholders: list[str], inert) -> list:
    """str.lower() as normalizers.

    ``normalizers.Lowercase`` maps character by character with Rust's tables; Python's lower()
    also applies the final-sigma rule (U+03A3 -> U+03C2 at the end of a word) and uses its own
    Unicode version.  The sigma rule is replayed with a regex whose classes are read off
    Python's own lower(); characters the two lowercase differently are left alone when both
    results are inert unknown characters, and otherwise kept away from Lowercase."""
    everything = _all_characters()
    sigma, final = "\u03a3", "\u03c2"
    # Python's "cased" and "case-ignorable" properties are not exposed, so ask lower() itself:
    # in c + "Σ" the sigma is final iff c is cased and not case-ignorable; in "A" + c + "Σ" iff
    # c is case-ignorable or cased; in "AΣ" + c iff c is case-ignorable or not cased.
    cased, ignorable = [], []
    for c in everything:
        after_c = (c + sigma).lower()[-1] == final
        if after_c:
            cased.append(c)
        elif ("A" + c + sigma).lower()[-1] == final and ("A" + sigma + c).lower()[1] == final:
            ignorable.append(c)
    cased_class, ignorable_class = _char_class(cased), _char_class(ignorable)
    steps = [normalizers.Replace(Regex(
        f"\\x{{3A3}}(?<={cased_class}{ignorable_class}*\\x{{3A3}})(?!{ignorable_class}*{cased_class})"), final)]

    rust = normalizers.Lowercase().normalize_str("\0".join(everything)).split("\0")
    skewed = [c for c, r in zip(everything, rust) if c != sigma and c.lower() != r
              and not all(inert(x) for x in c.lower() + r)]
    if len(skewed) > len(placeholders):
        raise ValueError(f"{len(skewed)} characters lowercase differently in Python and Rust")
    steps += [normalizers.Replace(c, p) for c, p in zip(skewed, placeholders)]
    steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(p, c.lower()) for c, p in zip(skewed, placeholders)]
    return steps


def _composition_seconds(rules: dict[str, str]) -> set[str]:
    """Characters NFC may join to the character before them (besides combining marks): second
    halves of canonical pairs (Python's tables, a superset of the crate's Unicode 9), Hangul
    vowels and trailing consonants, and whatever follows something in a charsmap rule."""
    seconds = {c for k in rules if len(k) > 1 for c in k[1:]}
    seconds |= {chr(c) for c in range(0x1161, 0x1176)} | {chr(c) for c in range(0x11A8, 0x11C3)}
    for c in _all_characters():
        d = unicodedata.decomposition(c)
        if d and not d.startswith("<") and len(d.split()) == 2:
            seconds.add(chr(int(d.split()[1], 16)))
    return seconds


def _charsmap_steps(normalizers, Regex, charsmap: bytes, rules: dict[str, str], seconds: set[str],
                    blocker: str, whitespace: list[str]) -> list:
    """Normalizers that apply the charsmap the way SentencePiece does.

    SentencePiece scans the text once, taking the longest matching rule at each position.
    ``normalizers.Precompiled`` instead looks up whole grapheme clusters and takes the shortest
    matching rule for all of it, dropping the rest ("ａ\\u0301" -> "a", SentencePiece "á"), and
    it never composes clusters of 6 bytes or more.  So:
    1. a blocker goes between two characters wherever no multi-character rule has them side by
       side and NFC could join them (the second one maps to a combining mark or to a character
       that composes with its predecessor);
    2. a breaker goes around every non-ASCII character: Precompiled then maps character by
       character;
    3. NFC performs the compositions of the multi-character rules (all "base variant + marks in
       canonical order" -> NFKC of it), the blockers keeping it from composing or reordering
       anything else; rules NFC's older tables miss are replayed literally;
    4. the blockers go.
    """
    follows: dict[str, set[str]] = {}  # character -> characters before it in some rule
    for key in rules:
        for a, b in zip(key, key[1:]):
            follows.setdefault(b, set()).add(a)
    groups: dict[frozenset, list[str]] = {}
    for c in _all_characters():
        out = rules.get(c, c)[:1]
        if c in follows or (out and (unicodedata.combining(out) or out in seconds)):
            groups.setdefault(frozenset(follows.get(c, ())), []).append(c)
    alternatives = []
    for before, chars in sorted(groups.items(), key=lambda g: min(g[1])):
        alternatives.append("(?=" + _char_class(chars) + ")"
                            + ("(?<!" + _char_class(before) + ")" if before else ""))
    # The first lookahead only makes the common case (nothing to block) fail fast.
    anywhere = "(?=" + _char_class([c for chars in groups.values() for c in chars]) + ")"
    # The breaker: U+001C is deleted by the charsmap, ends every grapheme cluster, and is Python
    # whitespace, so the input cannot contain it any more at this point.
    breaker = "\x1c"
    if rules.get(breaker) != "" or breaker not in whitespace:
        raise ValueError("the charsmap does not delete U+001C; cannot make Precompiled per-character")
    steps = [
        normalizers.Replace(Regex("(?<=.)" + anywhere + "(?:" + "|".join(alternatives) + ")"), blocker),
        # Two ASCII characters never share a grapheme cluster (CR LF is gone by now).
        normalizers.Replace(Regex("(?<=.)(?=[^\\x{0}-\\x{7F}])|(?<=[^\\x{0}-\\x{7F}])(?=.)"), breaker),
        normalizers.Precompiled(charsmap),
        normalizers.NFC(),
    ]
    # The NFC tables of the tokenizers crate are Unicode 9; the charsmap also composes scripts
    # encoded since (e.g. Kirat Rai, Unicode 16).  Those few rules are replayed literally.
    multi = [k for k in rules if len(k) > 1]
    mapped = ["".join(rules.get(c, c) for c in k) for k in multi]
    # One call for all: "\0" is a starter that composes with nothing, so it separates them.
    composed = normalizers.NFC().normalize_str("\0".join(mapped)).split("\0")
    missed = {got: rules[k] for k, got in zip(multi, composed) if got != rules[k]}
    for got in sorted(missed, key=lambda g: (-len(g), g)):
        steps.append(normalizers.Replace(got, missed[got]))
    steps.append(normalizers.Replace(blocker, ""))
    return steps


# --------------------------------------------------------------------------------------------
# Self-check: python tools/siglip_tokenizer.py --check
# --------------------------------------------------------------------------------------------

# Strings whose ids are known to differ, with the reason; reported as expected, not as failures.
# Empty: with the tiny model, none of the latent differences in the module docstring shows.
KNOWN_DIFFERENCES: dict[str, str] = {}

_FUZZ_PARTS = [
    "a", "b", "e", "k", "s", "x", "z", "0", "7", "A", "Z", "É", "é", "ñ", "ü", "ß", "İ", "ı", "Σ", "σ", "ς", "Ο",
    " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u1680",
    "\u2000", "\u2003", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u200b", "\u200c", "\u200d", "\u180e",
    "\ufeff", "\x00", "\x01", "\x7f", "\x8f", "\x9f", "\xad", ",", ".", "!", "?", "<", ">", "/", "\\", "-", "_",
    "'", '"', "(", ")", "@", "#", "~", "`", "|", "</s>", "<unk>", "<pad>", "</S>", "<UNK>", "▁", "▁▁", "<s>",
    "ａ", "Ａ", "ｚ", "１", "！", "，", "＜", "＞", "／", "　", "ﬁ", "ﬂ", "①", "㎏", "™", "…", "½", "²", "ℌ", "𝐀",
    "🅉", "\u0301", "\u0300", "\u0323", "\u0308", "\u0338", "\u0344", "\u0340", "\u0345", "\u3099", "\uff9e",
    "\ufe0f", "中", "国", "日本", "한", "\u1100", "\u1161", "\u11a8", "가", "ｶ", "ﾞ", "😀", "👍🏽", "👨\u200d👩\u200d👧",
    "🇫🇷", "¨", "´", "\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3", "\ufdd4", "\ue000", "\U000f0000", "\U00016d63",
    "\U00016d67", "\ua7cb", "\u0600", "\u0958", "airport", "river", "ships", "parked", "flooded", "farmland",
    "harbour", "the", "of",
]


def _test_strings() -> list[tuple[str, str]]:
    """(group, text) pairs: the cases the converter was written for, then a seeded fuzz."""
    caption = "An aerial view of a flooded farmland next to a river, with 3 ships parked in the harbour."
    cases = {
        "plain": ["a satellite image of an airport", "many storage tanks near a harbour", caption,
                  "dense residential area", "two planes are parked at the terminal", "oxbow lake", "zone"],
        "case": ["AN AERIAL VIEW OF A RIVER", "Aerial View Of Farmland", "aIrPoRt", "İstanbul", "STRASSE Straße"],
        "punctuation": ["a,b.c!?", "...", "!!!", "?!", string.punctuation, "(airport)", "river's edge",
                        "e-mail", "a/b", "x_y", "#5", "[ships]", "a,,,b", "ships,,,\n,,,planes"],
        "whitespace": ["a  b", "a\tb", "a\nb", "a\r\nb", "a \t\n b", " \t\n ", "   many    spaces   ",
                       "a\u00a0b", "a\u2003b", "a\u3000b", "a\x1cb", "a\x85b", "\u00a0airport\u3000",
                       "a\u200bb", "a\ufeffb", "a\u180eb", "a\u2028b\u2029c"],
        "edges": ["", " ", "\t", "\n", ".", "!?.,;:", "▁", " ▁ ", "a", "  river", "river  ", "\u3000river\u3000"],
        "special": ["<unk>", "</s>", "<pad>", "<s>", "a </s> b", "a</s>b", "</s>x", "x</s>", "</s></s>",
                    "<unk></s>", "a <unk> b", "</S>", "<UNK>", "<</s>>", "</s>中x", "</s> 中x", "</s>\u0338x",
                    "</s>¨x", "</s>\u200bx", "river</s>,lake", "▁</s>▁", "a▁b", "▁▁x", "x\u2581</s>"],
        "unicode": ["café", "niño", "über", "crème brûlée", "e\u0301", "cafe\u0301", "ñ", "n\u0303",
                    "ΟΔΟΣ", "ΟΔΟΣ ΟΔΟΣ.", "οδος", "ﬁeld", "ﬂooded ﬁelds", "ＡＩＲＰＯＲＴ", "ａｉｒｐｏｒｔ", "１２３",
                    "中国的机场", "空港", "공항", "한국어", "😀", "🛩️ over 🌊", "👨\u200d👩\u200d👧 family",
                    "🏳️\u200d🌈", "👍🏽", "🇫🇷", "a\u0301\u0301\u0301", "ａ\u0301", "x\u0323\u0308", "a\u0344",
                    "ﬁ\u0301", "r\x9f\u0301", "â\u0323", "\u1100\u1161\u11a8", "①②③", "㎏ ㎞", "½", "x²",
                    "\ufdd0\ufdd1\ufdd2", "\ue000", "\ua7cb", "\U00016d63\U00016d67", "\x00", "\x01river"],
        "digits": ["0", "12 storage tanks", "2024", "3.14", "1,000,000", "36 ships and 100 cars", "route 66"],
        "long": ["flooded farmland " * 6000, "x" * 100000, "airport, " * 40, "中" * 1000,
                 " ".join(["ships"] * 62), " ".join(["ships"] * 63), " ".join(["ships"] * 64),
                 " ".join(["ships"] * 62) + " </s>", " ".join(["ships"] * 63) + " </s>"],
    }
    out = [(group, text) for group, texts in cases.items() for text in texts]
    r = random.Random(CORPUS_SEED)
    out += [("fuzz", "".join(r.choice(_FUZZ_PARTS) for _ in range(r.randint(1, 12)))) for _ in range(20000)]
    return out


def _sweeps() -> list[tuple[str, object]]:
    """Every code point in a few contexts (as word items of long texts, 512 per text)."""
    return [
        ("inside a word", lambda c: f"a{c}b"),
        ("doubled, word start", lambda c: f"{c}{c}a"),
        ("after </s>", lambda c: f"</s>{c}x"),
        ("after letter variants", lambda c: f"ａ{c} é{c} ﬁ{c} 가{c}"),
    ]


def _check(sweep: bool = True) -> int:
    import time

    import transformers
    from tokenizers import Tokenizer
    from transformers import SiglipTokenizer

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="This sequence already has </s>")
    began = time.monotonic()
    max_length = 64
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        spm_path = Path(tmp) / "spiece.model"
        train_tiny_spm(str(spm_path))
        train_tiny_spm(str(Path(tmp) / "again.model"))
        first, again = (hashlib.sha256((Path(tmp) / name).read_bytes()).hexdigest()
                        for name in ("spiece.model", "again.model"))
        print(f"training twice: sha256 {first[:16]}... {'byte-identical' if first == again else 'DIFFERENT'}")
        failed |= first != again
        text = tokenizer_json_from_spm(str(spm_path), max_length)
        siglip = SiglipTokenizer(vocab_file=str(spm_path))
    print(f"tokenizer.json: {len(text)} characters ({time.monotonic() - began:.0f}s)")
    fast = Tokenizer.from_str(text)
    unbounded = Tokenizer.from_str(text)
    unbounded.no_truncation()
    unbounded.no_padding()

    def reference(s: str) -> list[int]:
        return siglip(s, padding="max_length", truncation=True, max_length=max_length)["input_ids"]

    def trimmed(ids: list[int]) -> list[int]:
        # pad = eos: "already ends with </s>" (none added) and "</s> added" pad to the same ids.
        while ids and ids[-1] == EOS_ID:
            ids = ids[:-1]
        return ids

    def unbounded_ids(s: str) -> tuple[list[int], list[int]]:
        return trimmed(siglip(s)["input_ids"]), trimmed(unbounded.encode(s).ids)

    expected, unexpected = [], []

    def report(group: str, s: str, want: list[int], got: list[int]) -> None:
        if s in KNOWN_DIFFERENCES:
            expected.append(s)
            print(f"  expected difference [{group}] {ascii(s[:80])}: {KNOWN_DIFFERENCES[s]}")
        else:
            unexpected.append(s)
            print(f"  MISMATCH [{group}] {ascii(s[:200])} (ids, trailing 1s dropped)\n"
                  f"    SiglipTokenizer {trimmed(want)}\n    tokenizer.json  {trimmed(got)}")

    tests = _test_strings()
    for group, s in tests:
        want, got = reference(s), fast.encode(s).ids
        if want != got or len(got) != max_length:
            report(group, s, want, got)
    print(f"{len(tests)} strings compared, padded/truncated to {max_length} ({time.monotonic() - began:.0f}s)")
    everything = _all_characters() if sweep else ""
    for name, make in _sweeps() if sweep else ():
        items = [make(c) for c in everything]
        for start in range(0, len(items), 512):
            batch = items[start:start + 512]
            want, got = unbounded_ids(" ".join(batch))
            if want != got:
                culprits = [s for s in batch if unbounded_ids(s)[0] != unbounded_ids(s)[1]]
                for s in culprits or [" ".join(batch)]:  # the items themselves, else their context
                    report(name, s, *unbounded_ids(s))
        print(f"sweep '{name}': all {len(items)} code points, untruncated ({time.monotonic() - began:.0f}s)")
    print(f"result: {len(unexpected)} unexpected mismatches; expected differences: "
          f"{', '.join(ascii(s) for s in expected) if expected else 'none'}")
    return 1 if failed or unexpected else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="train the tiny model twice, convert it, compare ids with SiglipTokenizer")
    parser.add_argument("--quick", action="store_true", help="with --check: skip the sweeps over all code points")
    args = parser.parse_args()
    if not args.check:
        parser.print_help()
        return 2
    return _check(sweep=not args.quick)


if __name__ == "__main__":
    sys.exit(main())
