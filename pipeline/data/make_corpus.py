"""Write the shipped summarization corpus (pipeline/data/summarization.jsonl), deterministically.

Run `python pipeline/data/make_corpus.py` to regenerate it; the output is byte-identical for a
given seed. The documents are templated news items: one key sentence carries the facts (place,
body, decision, amount, topic, day) among distractor sentences that mention other places and
numbers. The reference summary restates the key facts in one fixed order, so the task is
learnable by a tiny model (it has to find and copy the right slots, not memorise), and a model
that copies a distractor instead is penalised by ROUGE.

Each line: {"id", "split" ("train" | "heldout"), "document", "summary"}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CITIES = [
    "Brookfield", "Riverton", "Ashford", "Milton", "Oakdale", "Fairview", "Lakewood", "Granton",
    "Westport", "Kingsley", "Hollow Creek", "Easton", "Marlow", "Pinehurst", "Redmond", "Stanton",
    "Cedar Falls", "Norwood", "Bellmont", "Harlow", "Dunmore", "Elmstead", "Whitby", "Corvale",
]
BODIES = ["city council", "school board", "transit agency", "health department", "county board", "water authority"]
# (verb in the document, verb in the summary): the summary uses the headline present tense.
DECISIONS = [("approved", "approves"), ("rejected", "rejects"), ("delayed", "delays"), ("announced", "announces")]
OBJECTS = ["budget", "plan", "project", "grant"]
TOPICS = ["parks", "schools", "roads", "libraries", "housing", "bridges", "buses", "clinics"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OFFICIALS = [
    "Anna Lee", "Mark Stone", "Priya Shah", "Tom Grant", "Elena Ruiz", "David Cole", "Sara Kim", "James Ford",
    "Laura Chen", "Omar Haddad", "Nina Brooks", "Paul Meyer",
]
WEATHER = ["rainy", "cold", "sunny", "windy", "foggy", "warm"]

KEY_TEMPLATES = [
    "On {day}, the {body} of {city} {verb} a {amount} million dollar {obj} for {topic}.",
    "The {body} of {city} {verb} a {amount} million dollar {obj} for {topic} on {day}.",
    "In {city}, the {body} {verb} a {amount} million dollar {obj} for {topic} on {day}.",
]
OTHER_TEMPLATES = [
    "{official}, who leads the {body}, said the decision would affect {people} thousand residents.",
    "Reporters noted that the weather in {city2} was {weather} that week.",
    "The vote followed {months} months of public debate.",
    "A similar {obj2} for {topic2} was discussed in {city2} last year.",
    "Officials expect work to begin within {months2} months.",
    "Residents of {city2} asked for more {topic2} at the same meeting.",
]
SUMMARY_TEMPLATE = "{city} {body} {verb_summary} {amount} million dollar {obj} for {topic} on {day}."


def make_item(rng: random.Random, index: int, split: str) -> dict:
    city, city2 = rng.sample(CITIES, 2)
    body = rng.choice(BODIES)
    verb, verb_summary = rng.choice(DECISIONS)
    obj, obj2 = rng.choice(OBJECTS), rng.choice(OBJECTS)
    topic, topic2 = rng.sample(TOPICS, 2)
    slots = dict(
        city=city, city2=city2, body=body, verb=verb, verb_summary=verb_summary, obj=obj, obj2=obj2,
        topic=topic, topic2=topic2, day=rng.choice(DAYS), amount=rng.randint(2, 90),
        official=rng.choice(OFFICIALS), people=rng.randint(3, 80), weather=rng.choice(WEATHER),
        months=rng.randint(2, 11), months2=rng.randint(2, 11),
    )
    others = rng.sample(OTHER_TEMPLATES, rng.randint(2, 4))
    key = rng.choice(KEY_TEMPLATES)
    # The key sentence is first or second: position alone does not give the answer away.
    sentences = [t.format(**slots) for t in others]
    sentences.insert(rng.randint(0, 1), key.format(**slots))
    summary = SUMMARY_TEMPLATE.format(**slots)
    return {"id": f"news-{index:04d}", "split": split, "document": " ".join(sentences), "summary": summary}


def make_corpus(num_docs: int = 600, heldout: int = 80, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    return [make_item(rng, i, "heldout" if i >= num_docs - heldout else "train") for i in range(num_docs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("summarization.jsonl")))
    parser.add_argument("--num-docs", type=int, default=600)
    parser.add_argument("--heldout", type=int, default=80)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rows = make_corpus(args.num_docs, args.heldout, args.seed)
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    Path(args.out).write_text(text, encoding="utf-8")
    print(f"wrote {len(rows)} documents ({args.heldout} held out) to {args.out} ({len(text.encode())} bytes)")


if __name__ == "__main__":
    main()
