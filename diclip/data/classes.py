"""Class lists kept as data, so a dataset, its labels file and the CLIP prompts can be checked
against one another instead of trusting positional conventions scattered through the code.

Index 0 of every ``classes`` tuple is ``"background"``; image-level labels, prompt names and
generation words cover the foreground classes 1..K-1 in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

from diclip.errors import DataError

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
        k = len(self.classes)
        assert k >= 2 and self.classes[0] == "background", f"{self.name}: classes[0] must be background"
        assert len(set(self.classes)) == k, f"{self.name}: duplicate class names"
        assert len(self.prompt_names) == k - 1, f"{self.name}: {len(self.prompt_names)} prompt names for {k - 1} classes"
        assert len(self.generation_words) == k - 1, f"{self.name}: {len(self.generation_words)} generation words for {k - 1} classes"
        assert len(self.background_words) >= 1, f"{self.name}: no background words"

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
