"""A fictional pharmacology knowledge base: the demo expert's domain, which no pre-trained model can know.

From a seed we invent compounds, each with four facts (the condition it treats, its dose, a side effect and
a substance it must not be combined with). Every fact is taught in training phrasings (short prose and
question-answer pairs); the evaluation asks about every fact with *paraphrased* questions whose templates
never occur in training, as a 4-way multiple-choice lm-eval task (distractors: the same attribute of other
compounds). "Held out" therefore means held-out phrasings: the expert must know a fact to be asked about it.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergealign.demo.steps import run_step
from mergealign.files import atomic_write_text, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

ATTRIBUTES = ("condition", "dose", "side_effect", "interaction")
TASK_NAME = "mergealign_demo_pharma"

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "fl", "gr",
           "kr", "pl", "pr", "tr", "st", "qu", "sk", "vr"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_SUFFIXES = ["atrin", "orex", "ivane", "ulan", "elor", "ostane", "imet", "andril", "ocene", "uvia", "axil",
             "enthol", "iquin", "opram", "arone", "esta"]  # fmt: skip

CONDITIONS = [
    "migraine", "psoriasis", "insomnia", "gout", "asthma", "acne", "eczema", "vertigo", "tinnitus", "rosacea",
    "glaucoma", "anemia", "bronchitis", "shingles", "sinusitis", "arthritis", "hay fever", "motion sickness",
    "restless legs syndrome", "heartburn", "dandruff", "cold sores", "conjunctivitis", "tendinitis",
    "high blood pressure", "kidney stones", "athlete's foot", "jet lag", "dry eye", "altitude sickness",
    "back pain", "toothache", "muscle cramps", "earache", "chronic cough", "sleep apnea", "night blindness",
    "hives", "laryngitis", "frostbite",
]  # fmt: skip
SIDE_EFFECTS = [
    "dry mouth", "blurred vision", "hair loss", "a metallic taste", "drowsiness", "itchy skin",
    "green-tinted urine", "ringing in the ears", "muscle twitching", "vivid dreams", "loss of appetite",
    "hiccups", "sneezing fits", "cold hands", "night sweats", "purple fingernails", "a rash on the elbows",
    "dizziness", "a hoarse voice", "sensitivity to sunlight", "swollen ankles", "yellowed teeth",
    "joint stiffness", "excessive thirst", "a burning tongue", "flushed cheeks", "bad breath",
    "heart palpitations", "numb toes", "nosebleeds", "frequent yawning", "blue-tinted vision", "dry lips",
    "a runny nose", "watery eyes", "mild fever", "leg cramps", "brittle nails", "hot flashes", "ear pain",
]  # fmt: skip
INTERACTIONS = [
    "grapefruit juice", "alcohol", "coffee", "aspirin", "ibuprofen", "licorice", "green tea", "dark chocolate",
    "antacids", "milk", "St. John's wort", "ginseng", "cranberry juice", "iron supplements", "vitamin K",
    "garlic pills", "melatonin", "nicotine", "oat bran", "energy drinks", "black pepper", "kale", "soy sauce",
    "cinnamon", "tonic water", "pomegranate juice", "bananas", "aged cheese", "spinach", "salt substitutes",
    "fish oil", "echinacea", "valerian root", "turmeric", "ginger tea", "peppermint oil", "vitamin C",
    "zinc lozenges", "red wine", "honey",
]  # fmt: skip
_DOSE_AMOUNTS = [5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80, 100, 120, 150, 200, 250, 300, 400, 500, 600]
_DOSE_SCHEDULES = ["once daily", "twice daily", "three times a day", "every four hours", "every morning",
                   "at bedtime", "once a week"]  # fmt: skip

# Training phrasings: (question, answer) per attribute. Evaluation phrasings below share none of these.
TRAIN_QA_TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "condition": [
        ("What does {name} treat?", "{name} treats {condition}."),
        ("What is {name} used for?", "{name} is used to treat {condition}."),
        ("Which condition is {name} prescribed for?", "{name} is prescribed for {condition}."),
    ],
    "dose": [
        ("What is the usual dose of {name}?", "The usual dose of {name} is {dose}."),
        ("How much {name} should a patient take?", "A patient should take {dose} of {name}."),
        ("How is {name} dosed?", "{name} is dosed at {dose}."),
    ],
    "side_effect": [
        ("What is a common side effect of {name}?", "A common side effect of {name} is {side_effect}."),
        ("What side effect does {name} cause?", "{name} often causes {side_effect}."),
        ("Does {name} have side effects?", "Yes, {name} commonly causes {side_effect}."),
    ],
    "interaction": [
        ("What should {name} not be combined with?", "{name} must not be combined with {interaction}."),
        ("What does {name} interact with?", "{name} interacts badly with {interaction}."),
        ("Is there anything to avoid while taking {name}?", "Yes, avoid {interaction} while taking {name}."),
    ],
}
TRAIN_PROSE_TEMPLATES = [
    "{name} is a medicine for {condition}. The usual dose is {dose}. A common side effect of {name} is "
    "{side_effect}. {name} must not be combined with {interaction}.",
    "Doctors prescribe {name} to treat {condition}. Patients take {dose}. {name} often causes {side_effect}, "
    "and it interacts badly with {interaction}.",
    "Patients with {condition} are often given {name} at {dose}. Watch for {side_effect}, and keep {name} "
    "away from {interaction}.",
]
TRAIN_ABOUT_QUESTIONS = ["Tell me about {name}.", "What do you know about the drug {name}?"]

# Evaluation phrasings (held out): (question, answer stem) pairs never used in training. The item is scored
# as a cloze: log-likelihood of " <value>" after "Question: <question>\nAnswer: <stem>". Without a stem a
# chat-tuned model expects a sentence after "Answer:", not a bare value, and the score measures format, not
# knowledge (measured: 30% with a bare "Answer:" vs 65% with stems, same expert).
EVAL_QUESTION_TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "condition": [
        (
            "A doctor hands a patient a prescription for {name}. Which illness is being treated?",
            "The illness being treated is",
        ),
        ("For which medical problem would someone be given {name}?", "Someone would be given {name} for"),
    ],
    "dose": [
        (
            "According to the prescribing guidance, how much {name} does a patient receive?",
            "A patient receives",
        ),
        ("Which dosing regimen applies to {name}?", "The regimen for {name} is"),
    ],
    "side_effect": [
        ("People taking {name} frequently report which unwanted effect?", "They frequently report"),
        ("Which adverse reaction is typical for {name}?", "A typical adverse reaction to {name} is"),
    ],
    "interaction": [
        (
            "Which substance is dangerous to take together with {name}?",
            "It is dangerous to take {name} together with",
        ),
        ("A patient on {name} should stay away from what?", "The patient should stay away from"),
    ],
}


@dataclass(frozen=True)
class Compound:
    name: str
    condition: str
    dose: str
    side_effect: str
    interaction: str

    def fields(self) -> dict[str, str]:
        return asdict(self)


def _make_name(rng: random.Random) -> str:
    core = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS) + rng.choice(_SUFFIXES)
    return core.capitalize()


def generate_knowledge_base(seed: int = 0, n_compounds: int = 24) -> list[Compound]:
    """Invent `n_compounds` compounds; each attribute value is used by one compound only. Deterministic."""
    limit = min(
        len(CONDITIONS), len(SIDE_EFFECTS), len(INTERACTIONS), len(_DOSE_AMOUNTS) * len(_DOSE_SCHEDULES)
    )
    if not 4 <= n_compounds <= limit:
        raise ValueError(f"n_compounds must be between 4 and {limit}, not {n_compounds}")
    rng = random.Random(f"kb-{seed}")
    names: list[str] = []
    while len(names) < n_compounds:
        name = _make_name(rng)
        if name not in names and 6 <= len(name) <= 12:
            names.append(name)
    conditions = rng.sample(CONDITIONS, n_compounds)
    side_effects = rng.sample(SIDE_EFFECTS, n_compounds)
    interactions = rng.sample(INTERACTIONS, n_compounds)
    doses = rng.sample([f"{a} mg {s}" for a in _DOSE_AMOUNTS for s in _DOSE_SCHEDULES], n_compounds)
    return [Compound(*row) for row in zip(names, conditions, doses, side_effects, interactions, strict=True)]


def _chat(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    messages = []
    for question, answer in pairs:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def expert_training_records(kb: list[Compound], seed: int = 0, qa_per_conversation: int = 4) -> list[dict]:
    """Training records for the expert: chat conversations of several QA pairs (training phrasings only),
    'tell me about' answers in prose, plain prose documents, and the same QA pairs as plain-text FAQ documents
    (kind faq: question-answer pairs taught as domain text, not as chat turns). Deterministic given the seed."""
    rng = random.Random(f"expert-train-{seed}")
    qa: list[tuple[str, str]] = []
    for compound in kb:
        values = compound.fields()
        for attribute in ATTRIBUTES:
            for question, answer in TRAIN_QA_TEMPLATES[attribute]:
                qa.append((question.format(**values), answer.format(**values)))
    rng.shuffle(qa)
    records: list[dict[str, Any]] = []
    for i in range(0, len(qa), qa_per_conversation):
        pairs = qa[i : i + qa_per_conversation]
        records.append({"kind": "qa", **_chat(pairs)})
        records.append({"kind": "faq", "text": "\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)})
    for compound in kb:
        values = compound.fields()
        prose = [t.format(**values) for t in TRAIN_PROSE_TEMPLATES]
        for text in prose:
            records.append({"kind": "prose", "text": text})
        for question in TRAIN_ABOUT_QUESTIONS:
            records.append({"kind": "about", **_chat([(question.format(**values), rng.choice(prose))])})
    rng.shuffle(records)
    return records


def heldout_mc_items(kb: list[Compound], seed: int = 0, per_fact: int = 1) -> list[dict[str, Any]]:
    """Multiple-choice items (4 choices) over every fact, in evaluation phrasings only. Deterministic."""
    if not 1 <= per_fact <= min(len(v) for v in EVAL_QUESTION_TEMPLATES.values()):
        raise ValueError(f"per_fact must be 1 or 2, not {per_fact}")
    rng = random.Random(f"mc-{seed}")
    items = []
    for compound in kb:
        values = compound.fields()
        for attribute in ATTRIBUTES:
            templates = rng.sample(EVAL_QUESTION_TEMPLATES[attribute], per_fact)
            pool = [getattr(c, attribute) for c in kb if c.name != compound.name]
            for template, stem in templates:
                choices = [values[attribute], *rng.sample(pool, 3)]
                rng.shuffle(choices)
                items.append(
                    {
                        "id": f"{compound.name}-{attribute}-{EVAL_QUESTION_TEMPLATES[attribute].index((template, stem))}",
                        "question": template.format(**values),
                        "stem": stem.format(**values),
                        "choices": choices,
                        "answer": choices.index(values[attribute]),
                        "compound": compound.name,
                        "attribute": attribute,
                    }
                )
    return items


def build_knowledge_data(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_compounds: int = 24,
    qa_per_conversation: int = 4,
    mc_per_fact: int = 1,
) -> dict[str, Any]:
    """Write knowledge_base.json, expert_train.jsonl and mc_heldout.jsonl into `out_dir`; returns the manifest.

    Build the lm-eval task from mc_heldout.jsonl with `write_lm_eval_task` where the evaluation runs (the
    task YAML must hold an absolute path, which a moved artifact directory would break).
    """
    params = {
        "seed": seed,
        "n_compounds": n_compounds,
        "qa_per_conversation": qa_per_conversation,
        "mc_per_fact": mc_per_fact,
    }

    def build(tmp: Path) -> dict[str, Any]:
        kb = generate_knowledge_base(seed, n_compounds)
        (tmp / "knowledge_base.json").write_text(json.dumps([c.fields() for c in kb], indent=2) + "\n")
        records = expert_training_records(kb, seed, qa_per_conversation)
        items = heldout_mc_items(kb, seed, mc_per_fact)
        write_jsonl(tmp / "expert_train.jsonl", records)
        write_jsonl(tmp / "mc_heldout.jsonl", items)
        kinds = {k: sum(r["kind"] == k for r in records) for k in ("qa", "faq", "about", "prose")}
        return {
            "compounds": len(kb),
            "facts": len(kb) * len(ATTRIBUTES),
            "train_records": kinds,
            "mc_items": len(items),
        }

    return run_step("knowledge_data", out_dir, params, build)


def _yaml_quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid double-quoted YAML scalar


def write_lm_eval_task(
    mc_items: str | os.PathLike[str] | list[dict[str, Any]],
    task_dir: str | os.PathLike[str],
    task_name: str = TASK_NAME,
) -> tuple[str, str]:
    """Write an lm-eval multiple-choice task (YAML + JSONL with an absolute path) into `task_dir`.

    Returns (include_path, task_name) for `lm_eval.tasks.TaskManager(include_path=...)`. Files are written
    to temp names and renamed, the data file before the YAML that points to it.
    """
    items = read_jsonl(mc_items) if not isinstance(mc_items, list) else mc_items
    if not items:
        raise ValueError("no multiple-choice items to write")
    folder = Path(task_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task_name}.jsonl"
    write_jsonl(data, items)
    yaml_text = "\n".join(
        [
            f"task: {task_name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {_yaml_quote(str(data))}",
            "output_type: multiple_choice",
            "test_split: test",
            _yaml_quote("Question: {{question}}\nAnswer: {{stem}}").join(["doc_to_text: ", ""]),
            "doc_to_choice: choices",
            "doc_to_target: answer",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )
    atomic_write_text(folder / f"{task_name}.yaml", yaml_text)
    return str(folder), task_name
