"""Class lists kept as data, so a dataset, its labels file and the CLIP prompts can be checked
against one another instead of trusting positional conventions scattered through the code.

Index 0 of every ``classes`` tuple is ``"background"``; image-level labels, prompt names and
generation words cover the foreground classes 1..K-1 in the same order.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from diclip.errors import ConfigError, DataError

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

COCO_CLASSES: tuple[str, ...] = (
    "background",
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# What the CLIP text encoder sees for class ids 1..K-1. Copied verbatim from the DiCLIP/CLIP-ES
# reference code: the synonyms ("bird avian", "chair seat") were tuned there and change the CAMs.
VOC_PROMPT_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat",
    "cow", "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor screen",
)

# Background prompts suppress CAM activation on stuff classes that co-occur with objects.
VOC_BACKGROUND_WORDS: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
)

COCO_PROMPT_NAMES: tuple[str, ...] = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird avian", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "backpack,bag", "umbrella,parasol", "handbag,purse", "necktie", "suitcase", "frisbee", "skis",
    # "sknowboard" is a typo in the reference code; kept so CAMs match the published numbers.
    "sknowboard",
    "sports ball", "kite", "baseball bat", "glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "dessertspoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair seat",
    "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor screen", "laptop", "mouse",
    "remote control", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hairdrier,blowdrier",
    "toothbrush",
)

# COCO has real "keyboard" and "stop sign" classes, so those two must not be background prompts.
COCO_BACKGROUND_WORDS: tuple[str, ...] = tuple(
    w for w in VOC_BACKGROUND_WORDS if w not in ("keyboard", "sign")
)

# Words for the text-to-image prompts, as the reference generated its cache images with them
# (maintain_kv_cache/SD_generate_imgs: everyday nouns rather than the dataset's compound names).
VOC_GENERATION_WORDS: tuple[str, ...] = (
    "plane", "bicycle", "bird", "boat", "bottle", "buses", "car", "cat", "chair", "cow", "table",
    "dog", "horse", "motorbike", "people", "plant", "sheep", "sofa", "train", "monitor",
)
# The reference's COCO generation words (datasets/dif_coco/main.py, the per-class folders it generated
# into), in COCO class order. Its last entry is spelt 'toothbrus' there, which only breaks its folder
# look-up; the word here is the intended 'toothbrush'.
COCO_GENERATION_WORDS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# A tiny class set for the synthetic dataset: everyday objects CLIP knows, each drawn with a
# distinctive shape and colour family by ``diclip.data.synthetic``.
SYNTHETIC_CLASSES: tuple[str, ...] = ("background", "ball", "box", "kite", "star")
SYNTHETIC_PROMPT_NAMES: tuple[str, ...] = ("ball", "box", "kite", "star")
SYNTHETIC_BACKGROUND_WORDS: tuple[str, ...] = ("ground", "wall", "grass", "floor", "sky")
SYNTHETIC_GENERATION_WORDS: tuple[str, ...] = ("red ball", "blue box", "green kite", "yellow star")


def _duplicate(words: tuple[str, ...]) -> str | None:
    seen: set[str] = set()
    for w in words:
        if w in seen:
            return w
        seen.add(w)
    return None


def class_set_problems(classes: tuple[str, ...], prompt_names: tuple[str, ...], background_words: tuple[str, ...],
                       generation_words: tuple[str, ...]) -> list[str]:
    """What is inconsistent in a class list and its words (empty: nothing). Shared by the built-in sets
    and ``data.classes_file``, so a user's file is held to the same rules as VOC and COCO."""
    k = len(classes)
    problems = []
    if k < 2 or classes[0] != "background":
        problems.append("classes must start with 'background' and name at least one foreground class")
    for field, words in (("classes", classes), ("prompt_names", prompt_names), ("background_words", background_words)):
        dup = _duplicate(words)
        if dup is not None:  # two ids with one name (or one prompt) cannot be told apart
            problems.append(f"{field} lists {dup!r} twice")
    for field, words in (("prompt_names", prompt_names), ("generation_words", generation_words)):
        if len(words) != k - 1:
            problems.append(f"{len(words)} {field} for {k - 1} foreground classes (one per class after background, "
                            "in class order)")
    if not background_words:
        problems.append("no background_words (CLIP needs at least one background prompt)")
    clash = next((w for w in background_words if w in classes[1:] or w in prompt_names), None)
    if clash is not None:  # a background prompt that names a class suppresses that class's CAM
        problems.append(f"background word {clash!r} is also a foreground class or prompt name")
    return problems


@dataclass(frozen=True)
class ClassSet:
    """One dataset's classes and the words each model stage uses for them."""

    name: str
    classes: tuple[str, ...]  # index 0 is background
    prompt_names: tuple[str, ...]  # CLIP text prompts for classes[1:]
    background_words: tuple[str, ...]  # extra CLIP background prompts
    generation_words: tuple[str, ...]  # text-to-image words for classes[1:]

    def __post_init__(self) -> None:
        # Checked eagerly: a length mismatch silently shifts every class id by one downstream.
        problems = class_set_problems(self.classes, self.prompt_names, self.background_words, self.generation_words)
        if problems:
            raise DataError(f"class set {self.name!r}: {problems[0]}")

    @property
    def num_classes(self) -> int:
        """Number of classes including background (K)."""
        return len(self.classes)

    @property
    def foreground(self) -> tuple[str, ...]:
        """Class names 1..K-1, the order of image-level label vectors."""
        return self.classes[1:]


VOC = ClassSet("voc", VOC_CLASSES, VOC_PROMPT_NAMES, VOC_BACKGROUND_WORDS, VOC_GENERATION_WORDS)
COCO = ClassSet("coco", COCO_CLASSES, COCO_PROMPT_NAMES, COCO_BACKGROUND_WORDS, COCO_GENERATION_WORDS)
SYNTHETIC = ClassSet(
    "synthetic", SYNTHETIC_CLASSES, SYNTHETIC_PROMPT_NAMES, SYNTHETIC_BACKGROUND_WORDS,
    SYNTHETIC_GENERATION_WORDS,
)

# The toy world (``diclip.data.toy_world``): the class is the object's texture; the background is
# smooth colour blobs. The shipped toy CLIP was trained on these words.
TOY = ClassSet("toy", ("background", "stripes", "bars", "checks"), ("stripes", "bars", "checks"),
               ("blobs", "background"), ("stripes", "bars", "checks"))

assert VOC.num_classes == 21 and COCO.num_classes == 81 and len(COCO_GENERATION_WORDS) == 80
assert len(COCO_BACKGROUND_WORDS) == 23 and len(VOC_BACKGROUND_WORDS) == 25

_CLASS_SETS: dict[str, ClassSet] = {cs.name: cs for cs in (VOC, COCO, SYNTHETIC, TOY)}


def get_class_set(name: str | ClassSet) -> ClassSet:
    """Look up a class set by name ("voc", "coco", "synthetic", "toy"); a ClassSet passes through."""
    if isinstance(name, ClassSet):
        return name
    key = str(name).strip().lower()
    if key not in _CLASS_SETS:
        raise DataError(
            f"unknown class set {name!r}: known class sets are {', '.join(sorted(_CLASS_SETS))}"
        )
    return _CLASS_SETS[key]


def known_class_sets() -> list[str]:
    """Names accepted by ``get_class_set``."""
    return sorted(_CLASS_SETS)


# ----------------------------------------------------------------------------------------------
# data.classes_file: a user's own class list
# ----------------------------------------------------------------------------------------------
CLASS_FILE_FIELDS = ("classes", "prompt_names", "background_words", "generation_words")
"""Required lists of a classes file; ``name`` is optional (default: the file's stem)."""


def _word_list(raw: dict, field: str, where: str) -> tuple[str, ...]:
    if field not in raw:
        raise ConfigError(f"{where}: missing field {field!r} (a classes file needs {', '.join(CLASS_FILE_FIELDS)})")
    value = raw[field]
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
        raise ConfigError(f"{where}: {field} must be a list of non-empty strings, got {value!r}"[:300])
    return tuple(w.strip() for w in value)


def parse_class_file(text: str, uri: str) -> ClassSet:
    """A :class:`ClassSet` from the YAML text of a classes file; one-line :class:`ConfigError` on any problem."""
    import yaml

    where = f"data.classes_file {uri}"
    try:
        raw: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse YAML: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(CLASS_FILE_FIELDS)}")
    unknown = sorted(set(raw) - set(CLASS_FILE_FIELDS) - {"name"})
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (allowed: name, {', '.join(CLASS_FILE_FIELDS)})")
    words = [_word_list(raw, f, where) for f in CLASS_FILE_FIELDS]
    problems = class_set_problems(*words)
    if problems:
        raise ConfigError(f"{where}: {problems[0]}")
    stem = os.path.splitext(uri.rstrip("/").rsplit("/", 1)[-1])[0]
    name = raw.get("name", stem)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: name must be a non-empty string, got {name!r}")
    return ClassSet(name.strip(), *words)


def load_class_file(uri: str) -> ClassSet:
    """Read and check a classes file (local path or s3:// URI)."""
    from diclip import storage
    from diclip.errors import StorageError

    try:
        text = storage.read_text(uri)
    except (StorageError, FileNotFoundError, OSError) as e:
        raise ConfigError(f"data.classes_file: cannot read {uri} ({' '.join(str(e).split())[:200]}); "
                          "fix the path or unset data.classes_file") from e
    return parse_class_file(text, uri)


def class_set_for(data_cfg) -> ClassSet:
    """The class set a spec's ``data`` section names: ``data.classes_file`` when set, else ``data.dataset``.

    Every stage resolves its classes here, so a custom file reaches generation words, CLIP prompts,
    caches, label widths and mask checks alike."""
    if getattr(data_cfg, "classes_file", None):
        return load_class_file(data_cfg.classes_file)
    return get_class_set(data_cfg.dataset)


def class_identity(data_cfg, fields: tuple[str, ...] | None = None) -> str | dict[str, Any]:
    """What stage settings record about the classes: the built-in set's name, or a classes file's content
    (so editing the file makes the stages that depend on it stale, not its path). ``fields``: only the
    parts a stage uses (generation reads class names and generation words, not the CLIP prompts)."""
    if getattr(data_cfg, "classes_file", None):
        d = class_set_to_dict(class_set_for(data_cfg))
        return {k: v for k, v in d.items() if fields is None or k in fields}
    return data_cfg.dataset


def class_set_to_dict(cs: ClassSet) -> dict[str, Any]:
    """JSON-ready form (lists, not tuples: settings are compared with what was read back from JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cs).items()}


def class_set_from_dict(d: dict) -> ClassSet:
    """Inverse of ``dataclasses.asdict`` (a model card's ``class_set``)."""
    return ClassSet(str(d["name"]), *(tuple(d[f]) for f in CLASS_FILE_FIELDS))
