"""Natural-sounding filler text, generated from templates and word lists with a seeded RNG (no downloads).

The filler never contains digits (so a 4-digit code in a fact is unique in the prompt) and never uses the
phrases the facts use ("secret code", "lives in", ...), and the names in `FACT_NAMES` never appear in it.
"""

from __future__ import annotations

import random
import re

# names used in filler sentences; the facts draw from FACT_NAMES, which is disjoint
FILLER_NAMES = (
    "Oliver",
    "Amelia",
    "Henry",
    "Isla",
    "Jack",
    "Freya",
    "Oscar",
    "Ivy",
    "Arthur",
    "Rosie",
    "Leo",
    "Poppy",
    "Theo",
    "Willow",
    "Finn",
    "Hazel",
    "Alfie",
    "Daisy",
    "Hugo",
    "Ruby",
    "Felix",
    "Iris",
    "Jasper",
    "Mabel",
)
FACT_NAMES = (
    "Marta",
    "Tobias",
    "Greta",
    "Samuel",
    "Nadia",
    "Victor",
    "Elena",
    "Bruno",
    "Clara",
    "Dmitri",
    "Sofia",
    "Ingrid",
    "Rafael",
    "Yuki",
    "Lars",
    "Amara",
    "Pavel",
    "Leila",
    "Matteo",
    "Zofia",
    "Kenji",
    "Helga",
    "Omar",
    "Beatrix",
)
TOWNS = (
    "Ashford",
    "Bramble Cove",
    "Cedarwick",
    "Dunmore",
    "Elmstead",
    "Fairhaven",
    "Glenrock",
    "Hollowmere",
    "Ivybridge",
    "Juniper Falls",
    "Kingsbarrow",
    "Larkspur",
    "Millbrook",
    "Northwood",
    "Oakridge",
    "Pinehurst",
    "Queensferry",
    "Ravenholt",
    "Stonebridge",
    "Thornbury",
    "Umberleigh",
    "Valewood",
    "Westmarch",
    "Yarrowby",
)
FILLER_PLACES = (
    "the harbour",
    "the old library",
    "the market square",
    "the river bank",
    "the bakery",
    "the train station",
    "the village hall",
    "the hill above the town",
    "the greenhouse",
    "the museum",
    "the lighthouse",
    "the orchard",
    "the workshop",
    "the bookshop",
    "the football pitch",
    "the town square",
    "the flower market",
    "the pier",
)
PROFESSIONS = (
    "baker",
    "carpenter",
    "teacher",
    "gardener",
    "painter",
    "fisherman",
    "librarian",
    "nurse",
    "musician",
    "potter",
    "tailor",
    "farmer",
    "architect",
    "chef",
    "journalist",
    "photographer",
    "pilot",
    "engineer",
)
OBJECTS = (
    "lantern",
    "umbrella",
    "notebook",
    "bicycle",
    "kettle",
    "map",
    "violin",
    "telescope",
    "basket",
    "compass",
    "scarf",
    "clock",
    "painting",
    "teapot",
    "rowing boat",
    "wooden chair",
    "letter",
    "camera",
    "guitar",
    "quilt",
)
ADJECTIVES = (
    "quiet",
    "bright",
    "old",
    "narrow",
    "colourful",
    "busy",
    "peaceful",
    "windy",
    "cosy",
    "famous",
    "crowded",
    "small",
    "ancient",
    "sunny",
    "charming",
    "muddy",
    "elegant",
    "foggy",
    "lively",
    "modest",
)
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "grey", "brown", "golden", "silver")
FOODS = (
    "apple pie",
    "vegetable soup",
    "fresh bread",
    "roast potatoes",
    "lemon cake",
    "mushroom risotto",
    "pancakes",
    "cheese sandwiches",
    "strawberry jam",
    "fish stew",
    "plum tart",
    "onion soup",
    "honey biscuits",
    "pasta",
)
ANIMALS = (
    "a grey cat",
    "two ducks",
    "a sleepy dog",
    "a flock of geese",
    "a young fox",
    "a pair of swans",
    "a curious goat",
    "an old horse",
    "a family of rabbits",
    "a noisy crow",
    "a hedgehog",
    "a herd of cows",
)
TIMES = (
    "on Monday morning",
    "every Tuesday",
    "on Wednesday evening",
    "late on Thursday",
    "on Friday afternoon",
    "on Saturday",
    "early on Sunday",
    "in the spring",
    "during the summer",
    "in late autumn",
    "in the winter",
    "at dawn",
    "after lunch",
    "before sunset",
    "at midnight",
    "last week",
    "the day before yesterday",
)
WEATHER = (
    "rain",
    "snow",
    "fog",
    "sunshine",
    "strong wind",
    "a light drizzle",
    "a thunderstorm",
    "clear skies",
    "frost",
)
HOBBIES = (
    "chess",
    "gardening",
    "painting watercolours",
    "baking bread",
    "bird watching",
    "knitting",
    "sailing",
    "reading poetry",
    "playing the piano",
    "hiking",
    "fishing",
    "collecting stamps",
    "woodworking",
    "cycling",
)

TEMPLATES = (
    "{name} walked to {place} {time} and bought {food} for the family.",
    "The {adj} streets of {town} were full of visitors {time}.",
    "{name} works as a {job} and spends most weekends {hobby}.",
    "{time_cap}, {name} found a {color} {obj} near {place}.",
    "People in {town} often say that {place} is the most {adj} spot in the region.",
    "The forecast promised {weather} {time}, so {name} stayed at home with a good book.",
    "{name} and {name2} met at {place} to talk about {hobby}.",
    "A {adj} {job} from {town} painted a picture of {animal} by the water.",
    "{time_cap}, {animal} wandered across the road near {place}.",
    "The recipe for {food} that {name} uses was handed down from a grandmother in {town}.",
    "{name} keeps an old {obj} on the shelf as a reminder of a trip to {town}.",
    "Nobody in {town} remembers who first planted the {color} roses beside {place}.",
    "{name2} taught {name} how to repair a {obj} {time}.",
    "There was {weather} in {town} {time}, and the ferry did not sail.",
    "The {job} at {place} greeted every visitor with a warm smile.",
    "{name} prefers {food} to anything else served in {town}.",
    "{time_cap}, the {adj} market in {town} sold baskets of fruit and {color} flowers.",
    "Somebody left a {color} {obj} on a bench at {place}, and {name} took it to the lost property office.",
    "{name} has been learning {hobby} with a patient {job} from {town}.",
    "The children watched {animal} from the window of {place}.",
    "{name2} wrote a long letter to {name} describing the {adj} hills around {town}.",
    "According to local stories, a {job} once hid a {obj} somewhere under {place}.",
    "After {weather} {time}, the paths around {town} were {adj} and quiet.",
    "{name} cooked {food} for the neighbours, who brought {food2} in return.",
    "The museum in {town} has a {adj} collection of old maps and a {color} {obj}.",
    "{time_cap}, {name} cycled from {town} to {town2} without stopping.",
    "{name2} thinks that {hobby} is the best way to relax after a long day.",
    "The bells of {town} rang {time}, and {animal} scattered across the field.",
    "At {place}, a {job} explained the history of {town} to a group of students.",
    "{name} repainted the front door a bright {color} colour {time}.",
    "The bus to {town2} was late again, so {name} walked past {place} instead.",
    "In {town}, the {adj} cafe next to {place} serves {food} with tea.",
    "{name} and {name2} spent the afternoon {hobby} near {place}.",
    "A {color} kite got caught in the trees near {place} {time}.",
    "The {job} said that {weather} was expected over {town} for the rest of the week.",
    "{name} borrowed a {obj} from {name2} and promised to return it {time}.",
)


_A_AN = re.compile(r"\b([Aa]) (?=[aeiou])")


def _fill(template: str, rng: random.Random, names: tuple[str, ...]) -> str:
    n1, n2 = rng.sample(names, 2)
    t1, t2 = rng.sample(TOWNS, 2)
    f1, f2 = rng.sample(FOODS, 2)
    time = rng.choice(TIMES)
    text = template.format(
        name=n1,
        name2=n2,
        town=t1,
        town2=t2,
        food=f1,
        food2=f2,
        time=time,
        time_cap=time[0].upper() + time[1:],
        place=rng.choice(FILLER_PLACES),
        job=rng.choice(PROFESSIONS),
        obj=rng.choice(OBJECTS),
        adj=rng.choice(ADJECTIVES),
        color=rng.choice(COLORS),
        animal=rng.choice(ANIMALS),
        weather=rng.choice(WEATHER),
        hobby=rng.choice(HOBBIES),
    )
    return _A_AN.sub(lambda m: m.group(1) + "n ", text)


# SmolLM2's tokenizer gives ~1.19 tokens per word on the filler alone; 1.26 makes a task's whole text part
# (intro + filler + facts + question) come out at about `context_tokens` real tokens
TOKENS_PER_WORD = 1.26


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate of a text's token count (calibrated on SmolLM2; other BPEs are close)."""
    return round(len(text.split()) * TOKENS_PER_WORD)


def filler_sentences(rng: random.Random, target_tokens: int, exclude_towns: tuple[str, ...] = ()) -> list[str]:
    """Sentences totalling about `target_tokens` tokens; consecutive sentences never share a template.

    Towns in `exclude_towns` never appear (facts may mention them).
    """
    out: list[str] = []
    total = 0
    last = -1
    while total < target_tokens:
        if last < 0:
            k = rng.randrange(len(TEMPLATES))
        else:  # any template but the previous one
            k = rng.randrange(len(TEMPLATES) - 1)
            k += k >= last
        last = k
        sentence = _fill(TEMPLATES[k], rng, FILLER_NAMES)
        if any(t in sentence for t in exclude_towns):
            continue
        out.append(sentence)
        total += approx_tokens(sentence)
    return out


def split_even(items: list, parts: int) -> list[list]:
    """`items` in order, cut into `parts` consecutive chunks whose sizes differ by at most one."""
    n = len(items)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


def random_code(rng: random.Random, digits: int = 4, avoid: set[str] | None = None) -> str:
    """A code of `digits` digits without a leading zero, not in `avoid`."""
    while True:
        code = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if not avoid or code not in avoid:
            return code
