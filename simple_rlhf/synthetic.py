"""The built-in task `builtin:synthetic`: templated questions with chosen/rejected answers, and its ground truth."""

from __future__ import annotations

import random
import re

BUILTIN_DATASET = "builtin:synthetic"


_COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "an orange": "orange", "a plum": "purple"}


_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo", "Spain": "Madrid",
             "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens"}


_LEGS = {"spider": 8, "dog": 4, "bird": 2, "ant": 6, "cat": 4, "snake": 0, "horse": 4, "beetle": 6}


_ADD_MAX = 5  # "What is a plus b?" with a, b < 5: 25 sums, few enough for the tiny demo model to learn


_POLITE = ["{a}. I hope that helps!", "The answer is {a}. Happy to help.", "{a}. Let me know if you have more questions.",
           "It is {a}. Glad I could help!"]


_RUDE = ["{a}. Stop asking me obvious things.", "Obviously {a}. Figure it out yourself next time.",
         "{a}, you idiot.", "Ugh. {a}. Leave me alone."]


# What makes an answer polite or rude: the fixed phrases of the templates above (every polite template has one
# courteous phrase, every rude one at least one rude phrase; tested).
_POLITE_PHRASES = ("hope that helps", "happy to help", "let me know if you have more questions", "glad i could help")


_RUDE_PHRASES = ("stop asking", "obvious", "obviously", "figure it out yourself", "idiot", "ugh", "leave me alone")


_OPENINGS = [("Hi there!", "Hello! How can I help you today?"), ("Can I ask you something?", "Of course, go ahead."),
             ("Good morning.", "Good morning! What would you like to know?")]


# The rejected answer's flaw. Mostly wrong-but-polite: when rudeness is as common as wrongness, a reward model
# learns manners only (measured: accuracy 1.00 on rude pairs, 0.51 on wrong-only pairs), and a polite SFT policy
# then gives PPO no signal toward correct answers.
SYNTHETIC_FLAWS = {"wrong": 0.6, "rude": 0.2, "both": 0.2}


# The share of demonstrations (the `response` column, what SFT imitates) that name a wrong answer, politely. Writing
# an answer is harder than comparing two (InstructGPT's premise): demonstrations carry mistakes, the comparisons do
# not. So the SFT policy cannot be fully right, and what the reward model and PPO add shows in the ground truth
# (measured with SmolLM2: clean demonstrations give an SFT policy that is already right ~90% of the time).
SYNTHETIC_DEMONSTRATION_ERROR = 0.3


# The seeds of builtin:synthetic: the demo tokenizer's text, the training rows, the test rows (eval during
# training), and the held-out rows that only evaluate.py's ground-truth check reads.
SYNTHETIC_SEEDS = {"tokenizer": 0, "train": 1, "test": 2, "held_out": 1000}


def _synthetic_question(rng: random.Random) -> tuple[str, str, str]:
    """A templated question, its correct answer and a plausible wrong one."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(_ADD_MAX), rng.randrange(_ADD_MAX)
        wrong = rng.choice([n for n in range(2 * _ADD_MAX - 1) if n != a + b])
        return f"What is {a} plus {b}?", str(a + b), str(wrong)
    if kind == 1:
        thing, color = rng.choice(list(_COLORS.items()))
        return f"What color is {thing}?", color, rng.choice([c for c in _COLORS.values() if c != color])
    if kind == 2:
        country, city = rng.choice(list(_CAPITALS.items()))
        return f"What is the capital of {country}?", city, rng.choice([c for c in _CAPITALS.values() if c != city])
    animal, legs = rng.choice(list(_LEGS.items()))
    return f"How many legs does a {animal} have?", str(legs), str(rng.choice([n for n in (0, 2, 4, 6, 8) if n != legs]))


def synthetic_preference_rows(n: int, seed: int) -> list[dict]:
    """Rows in rm-static schema: the chosen answer is correct and polite; the rejected one is wrong, rude or both
    (drawn with the weights of SYNTHETIC_FLAWS; a wrong-only answer has the chosen one's wording, so the answer
    itself is the only difference). The response (SFT's demonstration) is the chosen answer, or with probability
    SYNTHETIC_DEMONSTRATION_ERROR the same polite sentence naming the wrong answer.

    Some prompts carry an earlier exchange, so that prompts have several turns, as real dialogues do.
    """
    rng = random.Random(seed)
    mistakes = random.Random(f"demonstrations-{seed}")  # its own stream: the other columns stay as they were
    rows = []
    for _ in range(n):
        history = ""
        for _ in range(rng.choice([0, 0, 1, 2])):
            if rng.random() < 0.5:
                human, assistant = rng.choice(_OPENINGS)
            else:
                human, answer, _ = _synthetic_question(rng)
                assistant = rng.choice(_POLITE).format(a=answer)
            history += f"\n\nHuman: {human}\n\nAssistant: {assistant}"
        question, right, wrong = _synthetic_question(rng)
        prompt = f"{history}\n\nHuman: {question}\n\nAssistant:"
        template = rng.choice(_POLITE)
        chosen = " " + template.format(a=right)
        response = " " + template.format(a=wrong) if mistakes.random() < SYNTHETIC_DEMONSTRATION_ERROR else chosen
        flaw = rng.choices(list(SYNTHETIC_FLAWS), weights=list(SYNTHETIC_FLAWS.values()))[0]
        if flaw != "wrong":
            template = rng.choice(_RUDE)
        rejected = " " + template.format(a=right if flaw == "rude" else wrong)
        rows.append({"prompt": prompt, "response": response, "chosen": chosen, "rejected": rejected})
    return rows


def synthetic_held_out_rows(n: int) -> list[dict]:
    """Rows drawn with a seed that no training step reads (evaluate.py's ground truth)."""
    return synthetic_preference_rows(n, SYNTHETIC_SEEDS["held_out"])


# The ground truth of builtin:synthetic, from the generator's own tables: the question alone fixes the correct
# answer and the answers it could be confused with (its answer space).
_QUESTION_KEYS = [
    (re.compile(r"What is (\d+) plus (\d+)\?"), lambda m: str(int(m[1]) + int(m[2])), None),
    (re.compile(r"What color is (.+)\?"), lambda m: _COLORS.get(m[1]), tuple(_COLORS.values())),
    (re.compile(r"What is the capital of (.+)\?"), lambda m: _CAPITALS.get(m[1]), tuple(_CAPITALS.values())),
    (re.compile(r"How many legs does an? (.+) have\?"),
     lambda m: str(_LEGS[m[1]]) if m[1] in _LEGS else None, None),
]


def synthetic_answer_key(question: str) -> tuple[str, tuple[str, ...] | None]:
    """The correct answer to a builtin:synthetic question, and its answer space (None: any whole number)."""
    for pattern, solve, space in _QUESTION_KEYS:
        match = pattern.fullmatch(question.strip())
        if match and solve(match) is not None:
            return solve(match), space
    raise ValueError(f"not a builtin:synthetic question: {question!r}")


def _mentions(text: str, space: tuple[str, ...] | None) -> set[str]:
    if space is None:
        return set(re.findall(r"(?<![\w.])-?\d+(?![\w]|\.\d)", text))
    return {c for c in space if re.search(rf"\b{re.escape(c)}\b", text, re.IGNORECASE)}


def _has_phrase(text: str, phrases: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(p)}\b", text, re.IGNORECASE) for p in phrases)


def check_synthetic_answer(prompt: str, answer: str) -> dict[str, bool]:
    """Ground truth for an answer to a builtin:synthetic prompt (the question is its last Human turn):
    correct = it names the correct answer and no other one of the question's answer space; polite = it has one of
    the polite templates' courteous phrases and none of the rude templates' phrases; both = correct and polite."""
    question = prompt.rsplit("Human:", 1)[-1].split("\n\nAssistant:", 1)[0]
    correct_answer, space = synthetic_answer_key(question)
    correct = _mentions(answer, space) == {correct_answer}
    polite = _has_phrase(answer, _POLITE_PHRASES) and not _has_phrase(answer, _RUDE_PHRASES)
    return {"correct": correct, "polite": polite, "both": correct and polite}
