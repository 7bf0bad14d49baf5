"""The 256 words of short pairing codes (written for p2pcloud; public domain).

Each word stands for one byte of a pairing code. The words are short, common, concrete
English words, easy to say aloud and to type on a phone, in lower case ASCII letters, with
no two words that sound alike. Codes are split on hyphens, so the words need not be
prefix-free.
"""

from __future__ import annotations

from typing import Final

WORDS: Final[tuple[str, ...]] = (
    "able", "acid", "acre", "aged", "aide", "aim", "air", "ajar", "alarm", "album", "alert",
    "alley", "amber", "ankle", "apple", "april", "apron", "arch", "arena", "arm", "army", "arrow",
    "art", "ash", "atom", "aunt", "avid", "awake", "axis", "baby", "bacon", "badge", "bag",
    "baker", "balm", "banjo", "bark", "barn", "basil", "bath", "beach", "bean", "bear", "bee",
    "bell", "belt", "bench", "berry", "bike", "bird", "blade", "blank", "blaze", "blend", "bloom",
    "blue", "board", "boat", "body", "bolt", "bone", "book", "boot", "bowl", "brave", "bread",
    "brick", "bride", "brook", "brush", "bud", "bulb", "bunny", "bus", "cabin", "cable", "cake",
    "calm", "camel", "camp", "candy", "cape", "card", "cargo", "carol", "cart", "case", "cedar",
    "chair", "chalk", "charm", "chess", "chief", "chin", "cider", "cinema", "city", "clay",
    "cliff", "clock", "cloud", "clown", "coach", "coast", "cobra", "cocoa", "coin", "comet",
    "coral", "cord", "corn", "couch", "cow", "crab", "crane", "crow", "crown", "cube", "cup",
    "curve", "daisy", "dance", "dawn", "deer", "delta", "denim", "desk", "diary", "dice", "dish",
    "dock", "dog", "doll", "dome", "door", "dove", "dragon", "dream", "drum", "duck", "dune",
    "eagle", "earth", "easel", "echo", "elbow", "elm", "ember", "engine", "fable", "face",
    "fairy", "farm", "feast", "fern", "ferry", "fiddle", "field", "fig", "film", "fish", "flag",
    "flame", "flute", "foam", "fog", "forest", "fox", "frog", "fruit", "gala", "garden", "gate",
    "gecko", "gem", "ghost", "giant", "ginger", "glass", "globe", "glove", "goat", "gold",
    "goose", "grape", "grass", "gravy", "guitar", "gull", "hammer", "harp", "hat", "hawk",
    "hazel", "heart", "hedge", "helmet", "hero", "hill", "hive", "honey", "horse", "hotel",
    "house", "hut", "igloo", "inch", "ink", "iron", "island", "ivory", "jacket", "jam", "jar",
    "jazz", "jelly", "jewel", "judge", "juice", "kettle", "key", "king", "kite", "kiwi", "knee",
    "koala", "ladder", "lake", "lamp", "lemon", "lens", "lily", "lime", "lion", "lotus", "lunar",
    "magnet", "mango", "maple", "marble", "meadow", "melon", "mint", "mirror", "moon", "moose",
    "mouse", "mural", "nest", "noble", "oak", "ocean", "olive", "onion", "orbit", "otter",
)
"""Sorted, unique, 256 entries: ``WORDS[b]`` encodes the byte ``b``."""

INDEX: Final[dict[str, int]] = {word: i for i, word in enumerate(WORDS)}
"""Word to byte value."""
