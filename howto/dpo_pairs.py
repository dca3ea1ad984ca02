"""Build the small preference set of howto/dpo.md: short questions, each with a direct answer (chosen: "The capital
of France is Paris.") and an answer in the ways a small instruct model goes wrong (rejected): talking around the
question without answering it, or answering and then rambling on. Both are its own kind of text; DPO has to teach it
to prefer the direct answer, which shows in its greedy answers.

    python howto/dpo_pairs.py --out data/direct_answers.jsonl

The set is made from the lists below and a seeded random generator: the same file on every machine.
"""

import json
import random
from pathlib import Path
from typing import Optional

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Turkey": "Ankara",
    "Russia": "Moscow", "Ireland": "Dublin", "Belgium": "Brussels", "the Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Hungary": "Budapest", "Australia": "Canberra", "New Zealand": "Wellington",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Iran": "Tehran",
    "Morocco": "Rabat", "Nigeria": "Abuja", "Cuba": "Havana",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "early": "late", "light": "dark", "happy": "sad",
    "open": "closed", "full": "empty", "strong": "weak", "old": "young", "rich": "poor", "wet": "dry",
    "hard": "soft", "loud": "quiet", "high": "low", "long": "short", "thick": "thin", "win": "lose",
    "push": "pull", "buy": "sell", "inside": "outside", "first": "last", "easy": "difficult", "clean": "dirty",
    "heavy": "light", "day": "night", "begin": "end", "true": "false", "near": "far",
}
PLURALS = {
    "mouse": "mice", "child": "children", "tooth": "teeth", "foot": "feet", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives", "wolf": "wolves", "box": "boxes",
    "city": "cities", "baby": "babies", "bus": "buses", "cactus": "cacti", "sheep": "sheep", "fish": "fish",
    "potato": "potatoes", "hero": "heroes", "life": "lives", "ox": "oxen", "wife": "wives", "church": "churches",
}
YOUNG = {
    "cat": "a kitten", "dog": "a puppy", "cow": "a calf", "horse": "a foal", "sheep": "a lamb", "goat": "a kid",
    "frog": "a tadpole", "duck": "a duckling", "bear": "a cub", "lion": "a cub", "swan": "a cygnet",
    "kangaroo": "a joey", "pig": "a piglet", "deer": "a fawn", "goose": "a gosling",
}
COLORS = {
    "a ripe banana": "yellow", "grass": "green", "a clear sky": "blue", "snow": "white", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "a flamingo": "pink", "milk": "white",
    "a crow": "black", "chocolate": "brown", "a lime": "green", "a ruby": "red", "the sea on a sunny day": "blue",
}


def pairs(seed: int = 0) -> list[dict]:
    """{prompt, chosen, rejected} records: the direct answer, and an answer that evades or rambles."""
    rng = random.Random(seed)
    ramble = ["This is a fundamental concept that has been discussed for centuries, and it can be understood in many "
              "different ways.", "It is a classic question with a long history, and many people find it fascinating.",
              "However, the answer can depend on the context in which the question is asked."]
    rows = [(f"What is the capital of {c}?", f"The capital of {c} is {a}.",
             f"{c} is a country with a rich history and culture, and its capital is a city of great importance.")
            for c, a in CAPITALS.items()]
    rows += [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.",
              f"The opposite of {w} is {o}. {rng.choice(ramble)}") for w, o in OPPOSITES.items()]
    rows += [(f"What is the plural of {w}?", f"The plural of {w} is {p}.",
              f"The plural of {w} is a question that depends on the context in which the word is used.")
             for w, p in PLURALS.items()]
    rows += [(f"What is a young {a} called?", f"A young {a} is called {y}.",
              f"A young {a} is a type of {a} that is typically smaller and more agile than an adult {a}.")
             for a, y in YOUNG.items()]
    rows += [(f"What color is {t}?", f"{t[0].upper() + t[1:]} is {c}.",
              f"The color of {t} is a vibrant and cheerful shade. {rng.choice(ramble)}") for t, c in COLORS.items()]
    for _ in range(40):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}.",
                     f"To add {a} and {b}, we need to combine the numbers in a way that results in a single value."))
    for _ in range(30):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        rows.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}.",
                     f"To find {a} times {b}, we can use the concept of multiplication in a different way."))
    rng.shuffle(rows)
    return [{"prompt": q, "chosen": chosen, "rejected": rejected} for q, chosen, rejected in rows]


def main(out: Path = Path("data/direct_answers.jsonl"), chosen_out: Optional[Path] = None, seed: int = 0) -> Path:
    """Write the pairs as JSONL, one {prompt, chosen, rejected} per line.

    Args:
        out: The file to write.
        chosen_out: Also write the chosen answers here as instruction records, {instruction, output}: the supervised
            finetune to compare with, on the same prompts.
        seed: Seeds the arithmetic questions, the answers' rambling and the order.
    """
    records = pairs(seed)
    for path, lines in ((out, records), (chosen_out, [{"instruction": r["prompt"], "output": r["chosen"]}
                                                      for r in records])):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"Wrote {len(records)} preference pairs to {out}" + (f" and their chosen answers to {chosen_out}"
                                                                 if chosen_out else "") + f", e.g. {records[0]}")
    return out


if __name__ == "__main__":
    from lit_lora.cli import cli

    cli(main)
