"""A stage whose items mostly fail is not complete: failures recorded, no manifest, one line with reasons."""
import pyarrow as pa
import pytest

from diclip import storage
from diclip.errors import StageFailed
from ray_jobs.runtime.shards import failure_reasons, finalize, write_shard
from tests.helpers import tiny_spec


def test_all_failed_stage_writes_no_manifest_and_names_the_reasons(tmp_path):
    spec = tiny_spec(str(tmp_path / "run"))
    uri = spec.evaluate.output
    failures = [(f"seg/img{i}", f"ClassListMismatch: mask /d/img{i}.png has class id 23 but class list 'synthetic' "
                                f"has 5 classes") for i in range(12)]
    with pytest.raises(StageFailed) as e:
        finalize(uri, "evaluate", spec, spec.evaluate, failures)
    msg = str(e.value)
    assert msg.startswith("evaluate: 12 of 12 items failed (100% > max_failed_fraction 5%)") and "\n" not in msg
    assert "12x ClassListMismatch: mask <item> has class id N" in msg
    assert not storage.is_complete(uri)  # a re-run does not skip it
    assert len(storage.read_failures(uri)) == 12  # but what went wrong is kept


def test_a_few_failures_within_the_tolerance_complete_the_stage(tmp_path):
    spec = tiny_spec(str(tmp_path / "run"), "evaluate.max_failed_fraction=0.1")
    uri = spec.evaluate.output
    write_shard(uri, pa.table({"item_id": [f"i{k}" for k in range(19)]}))
    manifest = finalize(uri, "evaluate", spec, spec.evaluate, [("i19", "DataError: cannot decode image x/i19.jpg")])
    assert storage.is_complete(uri) and manifest.num_failed == 1 and manifest.num_items == 19
    with pytest.raises(StageFailed, match="2 of 21 items failed"):
        finalize(uri, "evaluate", spec, tiny_spec(str(tmp_path / "run")).evaluate,
                 [("i19", "x"), ("i18", "y")])


def test_failure_reasons_group_the_same_problem():
    f = [("a_1", "DataError: cannot decode image /x/a_1.jpg (OSError)"),
         ("b_22", "DataError: cannot decode image /x/b_22.jpg (OSError)"), ("c", "ValueError: boom 7")]
    assert failure_reasons(f) == [("DataError: cannot decode image <item> (OSError)", 2), ("ValueError: boom N", 1)]
