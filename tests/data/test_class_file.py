"""data.classes_file: a user's own class list, checked with one-line errors before anything runs."""
import pytest

from diclip.data import class_identity, class_set_for, get_class_set, open_split
from diclip.data.classes import parse_class_file
from diclip.data.synthetic import generate_synthetic
from diclip.errors import ConfigError, DataError
from ray_jobs.validate import check_class_file
from tests.helpers import SHAPES_CLASS_FILE, tiny_spec



def test_a_classes_file_becomes_the_specs_class_set(tmp_path):
    path = tmp_path / "shapes.yaml"
    path.write_text(SHAPES_CLASS_FILE)
    spec = tiny_spec(str(tmp_path / "run"), f"data.classes_file={path}")
    cs = class_set_for(spec.data)
    assert cs.name == "shapes" and cs.classes == ("background", "ball", "box") and cs.num_classes == 3
    assert cs.generation_words == ("red ball", "blue box") and cs.background_words == ("ground", "wall", "sky")
    assert class_identity(spec.data)["prompt_names"] == ["ball", "box"]  # settings record the content
    assert class_identity(tiny_spec(str(tmp_path / "run")).data) == "synthetic"  # built-ins: just the name
    assert parse_class_file(SHAPES_CLASS_FILE.replace("name: shapes\n", ""), "s3://b/my-classes.yaml").name == "my-classes"


@pytest.mark.parametrize("edit, message", [
    (("prompt_names: [ball, box]", "prompt_names: [ball]"), "1 prompt_names for 2 foreground classes"),
    (("generation_words: [red ball, blue box]", "generation_words: [a, b, c]"), "3 generation_words for 2"),
    (("classes: [background, ball, box]", "classes: [background, ball, ball]"), "classes lists 'ball' twice"),
    (("classes: [background, ball, box]", "classes: [ball, box, background]"), "must start with 'background'"),
    (("background_words: [ground, wall, sky]\n", ""), "missing field 'background_words'"),
    (("background_words: [ground, wall, sky]", "background_words: [ground, box]"), "background word 'box'"),
    (("name: shapes", "nmae: shapes"), "unknown field 'nmae'"),
    (("prompt_names: [ball, box]", "prompt_names: ball"), "prompt_names must be a list"),
    (("classes: [", "classes: [[["), "cannot parse YAML"),
])
def test_inconsistent_classes_files_are_one_line_config_errors(tmp_path, edit, message):
    path = tmp_path / "bad.yaml"
    path.write_text(SHAPES_CLASS_FILE.replace(*edit))
    spec = tiny_spec(str(tmp_path / "run"), f"data.classes_file={path}")
    with pytest.raises(ConfigError) as e:
        class_set_for(spec.data)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_is_one_line(tmp_path):
    spec = tiny_spec(str(tmp_path / "run"), f"data.classes_file={tmp_path}/nope.yaml")
    with pytest.raises(ConfigError, match="data.classes_file: cannot read"):
        class_set_for(spec.data)


def test_validate_checks_the_dataset_against_the_classes_file(tmp_path):
    """A 4-class synthetic dataset read with a 3-class file: labels 4 wide, masks with ids 3 and 4."""
    root = tmp_path / "data"
    generate_synthetic(str(root), num_train=4, num_val=2, image_size=32, show_progress=False)
    path = tmp_path / "shapes.yaml"
    path.write_text(SHAPES_CLASS_FILE)
    base = [f"data.classes_file={path}", f"data.root={root}", "pipeline.stages=[correlate]"]
    spec = tiny_spec(str(tmp_path / "run"), *base)
    with pytest.raises(DataError) as e:
        check_class_file(spec)
    assert "'shapes' has 2 foreground classes" in str(e.value) and "\n" not in str(e.value)
    (root / "cls_labels.npy").unlink()  # labels derived from the masks: the masks' class ids are checked
    with pytest.raises(DataError, match=r"has class id [34] but class list 'shapes' has 3 classes"):
        for i in open_split(spec.data, "train").ids:
            open_split(spec.data, "train").read_mask(i)
    with pytest.raises(DataError, match="has class id"):
        check_class_file(spec)
    # the built-in list still fits the data
    check_class_file(tiny_spec(str(tmp_path / "run"), f"data.root={root}", "pipeline.stages=[correlate]"))
    assert get_class_set("synthetic").num_classes == 5


def test_the_readme_own_dataset_command_works_as_written(tmp_path):
    """README "Your own dataset": its laptop command, taken from README.md and run as a user would (from a
    folder holding shapes.yaml; configs/ is the repository's), on a 3-class VOC-layout folder. Only
    data.root is swapped for this test's folder; the rest of the line is the README's."""
    import os
    import shlex
    import subprocess
    import sys

    from diclip.data.classes import parse_class_file
    from tests.helpers import REPO, readme_commands

    (line,) = [c for section, c in readme_commands(REPO / "README.md")
               if section == "Your own dataset" and c.startswith(".venv/bin/diclip validate configs/demo.yaml")]
    words = shlex.split(line)
    assert "data.root=/data/shapes" in words and "data.classes_file=shapes.yaml" in words
    data = tmp_path / "shapes"  # what a user brings: VOC layout, the file's 3 classes, not made by this pipeline
    generate_synthetic(str(data), num_train=4, num_val=2, image_size=32, show_progress=False,
                       class_set=parse_class_file(SHAPES_CLASS_FILE, "shapes.yaml"))
    (data / "synthetic.json").unlink()
    assert sorted(os.listdir(data / "ImageSets" / "Segmentation")) == ["train.txt", "val.txt"]
    (tmp_path / "shapes.yaml").write_text(SHAPES_CLASS_FILE)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)

    def run(root):
        argv = [w.replace("/data/shapes", str(root)) for w in words[1:]]
        return subprocess.run([sys.executable, "-m", "diclip.cli", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    r = run(data)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "ok: configs/demo.yaml (generate, mask, cache, correlate, train, evaluate, infer)"
    for stage, row in zip(["generate", "mask", "cache", "correlate", "train", "evaluate", "infer"], lines[1:]):
        assert row.split()[:3] == [stage, "to", "run"] and row.split()[-1] == str(tmp_path / "runs" / "shapes" / stage)
    # the same line on a dataset of other classes (the 4-class synthetic set) is refused in one line
    other = tmp_path / "other"
    generate_synthetic(str(other), num_train=4, num_val=2, image_size=32, show_progress=False)
    r = run(other)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "'shapes' has 2 foreground classes" in err[0], r.stderr
