"""The embedded default corpus: short, simple stories generated deterministically from a small grammar.

It ships as code (no download, no licence question), is varied enough that a model must learn words,
agreement and story structure, and simple enough that a ~1M-parameter model learns it visibly in about
two minutes on two CPU cores. It is synthetic: use real text (e.g. WikiText-2) for quality figures.
"""

from __future__ import annotations

import random

NAMES = ["Tom", "Anna", "Ben", "Lily", "Max", "Sara", "Leo", "Mia", "Sam", "Emma", "Jack", "Lucy"]
ANIMALS = ["cat", "dog", "bird", "rabbit", "fox", "duck", "frog", "bear", "mouse", "horse"]
PLACES = ["the park", "the garden", "the forest", "the beach", "the river", "the farm", "the hill", "the town"]
THINGS = ["a red ball", "a big box", "a blue kite", "a shiny stone", "a small boat", "a yellow hat",
          "an old map", "a warm cake", "a green apple", "a little drum"]
FEELINGS = ["happy", "sad", "tired", "hungry", "scared", "excited", "curious", "proud"]
WEATHER = ["The sun was bright", "It was raining", "The wind was cold", "The sky was blue", "Snow fell softly"]
TIMES = ["One day", "One morning", "Once upon a time", "Last summer", "Early in the morning", "After lunch"]
ACTIONS = ["played with", "looked at", "found", "lost", "shared", "carried", "painted", "hid"]
MOVES = ["ran to", "walked to", "went to", "jumped over to", "hurried to"]
ENDINGS = ["They were best friends.", "It was a good day.", "Then they went home to sleep.",
           "Everyone laughed and clapped.", "They promised to come back tomorrow."]


def _story(r: random.Random) -> str:
    hero, friend = r.sample(NAMES, 2)
    animal, place, thing = r.choice(ANIMALS), r.choice(PLACES), r.choice(THINGS)
    feeling = r.choice(FEELINGS)
    lines = [
        f"{r.choice(TIMES)}, {hero} {r.choice(MOVES)} {place} with a {animal}.",
        f"{r.choice(WEATHER)}, and {hero} felt {feeling}.",
        f"At {place}, {hero} {r.choice(ACTIONS)} {thing}.",
        f'"Look, {friend}!" said {hero}. "I have {thing}."',
        f"{friend} smiled and said, \"Can I play too?\"",
    ]
    if r.random() < 0.5:
        lines.append(f"The {animal} was {r.choice(FEELINGS)}, so {friend} gave it some food.")
    if r.random() < 0.4:
        lines.append(f"Then {hero} and {friend} {r.choice(MOVES)} {r.choice(PLACES)}.")
    lines.append(r.choice(ENDINGS))
    return " ".join(lines)


def default_corpus(n_stories: int = 6000, seed: int = 0) -> list[str]:
    """A list of documents (one story each); deterministic for a given seed."""
    r = random.Random(seed)
    return [_story(r) for _ in range(n_stories)]
