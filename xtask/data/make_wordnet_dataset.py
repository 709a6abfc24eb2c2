#!/usr/bin/env python3
"""Builds the embedded instruction dataset from WordNet 3.0 (Debian package `wordnet-base`).

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn
    python3 xtask/data/make_wordnet_dataset.py /tmp/wn/usr/share/wordnet crates/data/datasets/wordnet

Every pair is one WordNet sense that has a usage example: the user asks what a word means, the assistant answers
with the sense's gloss and its example, in the chat `messages` format:
    {"messages": [{"role": "user", "content": "What does the word \\"sedate\\" mean?"},
                  {"role": "assistant", "content": "\\"Sedate\\" (verb) means: cause to be calm or quiet as by ..."}]}
Only single-word lemmas in lower case, the most frequent sense of each word (by WordNet's tag counts, then by
offset), and one pair per word. Selection and the train / held-out split are deterministic (seeded shuffle).
Standard library only.
"""
import json
import random
import re
import sys
from pathlib import Path

POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
PAIRS = 3000
HELDOUT = 200


def senses(root):
    """(word, pos name, gloss, examples, offset) for the first lemma of every synset with an example."""
    for file, pos in POS.items():
        for line in (root / f"data.{file}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            word = fields[4]
            examples = re.findall(r'"([^"]+)"', gloss)
            definition = gloss.split(";")[0].strip()
            if not examples or not re.fullmatch(r"[a-z]{3,}", word) or not definition or definition.startswith('"'):
                continue
            yield word, pos, definition, examples[0].strip(), fields[0]


def tag_counts(root):
    counts = {}
    for line in (root / "cntlist.rev").read_text(encoding="latin-1").splitlines():
        key, _, count = line.split()
        lemma = key.split("%")[0]
        counts[lemma] = counts.get(lemma, 0) + int(count)
    return counts


def pair(word, pos, definition, example):
    question = f'What does the word "{word}" mean?'
    answer = f'"{word.capitalize()}" ({pos}) means: {definition}. For example: "{example}"'
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main(root, out):
    root, out = Path(root), Path(out)
    counts = tag_counts(root)
    best = {}
    for word, pos, definition, example, offset in senses(root):
        if word not in best:  # data files list senses by offset; the first with an example per word wins
            best[word] = (word, pos, definition, example)
    words = sorted(best, key=lambda w: (-counts.get(w, 0), w))[: PAIRS * 2]
    rng = random.Random(20261130)
    rng.shuffle(words)
    chosen = [pair(*best[w]) for w in words[:PAIRS]]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", chosen[HELDOUT:]), ("heldout.jsonl", chosen[:HELDOUT])):
        with open(out / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(chosen) - HELDOUT} train + {HELDOUT} held-out pairs from {len(best)} words with examples -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
