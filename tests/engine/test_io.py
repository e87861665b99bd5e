import hashlib
import json
import os

import pytest
import torch

from rectflow.engine.io import (
    append_jsonl,
    atomic_path,
    check_writable,
    exclusive_lock,
    load_json,
    load_tensors,
    make_dirs,
    read_jsonl,
    save_json,
    save_tensors,
    scan_jsonl,
    sha256_file,
)
from rectflow.errors import CheckpointError, OutputError
from tests.conftest import gen


def test_atomic_path_success_replaces_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # parent does not exist yet
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_exception_keeps_target_and_removes_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_json_round_trip(tmp_path):
    obj = {"a": 1, "b": [1.5, None, "x"], "c": {"d": True}}
    save_json(tmp_path / "x.json", obj)
    assert load_json(tmp_path / "x.json") == obj


def test_load_json_missing_names_file(tmp_path):
    p = tmp_path / "missing.json"
    with pytest.raises(CheckpointError, match="missing.json"):
        load_json(p)


@pytest.mark.parametrize("content", ["{not json", ""])
def test_load_json_invalid_names_file(tmp_path, content):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(CheckpointError, match="bad.json"):
        load_json(p)


def test_tensors_round_trip_with_metadata(tmp_path):
    g = gen(0)
    tensors = {"w": torch.randn(3, 4, generator=g), "i": torch.arange(5), "s": torch.tensor(2.5)}
    meta = {"step": 7, "cfg": {"width": 16, "mult": [1, 2]}, "name": "x", "none": None}
    save_tensors(tmp_path / "t.safetensors", tensors, meta)
    got, got_meta = load_tensors(tmp_path / "t.safetensors")
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    assert got_meta == meta


def test_load_tensors_truncated_file(tmp_path):
    p = tmp_path / "t.safetensors"
    save_tensors(p, {"w": torch.randn(64, 64, generator=gen(1))}, {"step": 1})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        load_tensors(p)


def test_load_tensors_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_tensors(tmp_path / "nope.safetensors")


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5 + b"tail"
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == expected
    assert sha256_file(p, chunk=7) == expected  # several reads
    p.write_bytes(data + b"!")
    assert sha256_file(p) != expected


def test_jsonl_round_trip(tmp_path):
    p = tmp_path / "m.jsonl"
    assert read_jsonl(p) == []  # missing file: no rows
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "tag": "x"}]
    for r in rows:
        append_jsonl(p, r)
    assert read_jsonl(p) == rows
    assert len(p.read_text().splitlines()) == 2


def test_read_jsonl_skips_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    for r in rows:
        append_jsonl(p, r)
    torn = json.dumps({"step": 3, "loss": 0.125})[:9]
    with open(p, "a") as f:
        f.write(torn)  # a kill mid-write: no newline, incomplete JSON
    assert read_jsonl(p) == rows


def test_output_paths_that_cannot_be_written_are_errors_naming_them(tmp_path):
    """issue 13 item 9: a file where a folder is needed, or a folder where a file is, used to
    escape as FileExistsError / NotADirectoryError / IsADirectoryError tracebacks."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    cases = [
        (lambda: atomic_path(afile / "out.npy").__enter__(), "afile"),
        (lambda: atomic_path(afile / "deeper" / "out.npy").__enter__(), "afile"),
        (lambda: atomic_path(tmp_path).__enter__(), "is a directory"),
        (lambda: save_json(afile / "x.json", {}), "afile"),
        (lambda: check_writable(afile, directory=True), "is a file, not a directory"),
        (lambda: check_writable(afile / "run", directory=True), "afile"),
        (lambda: check_writable(tmp_path), "is a directory"),
        (lambda: make_dirs(afile / "run"), "afile"),
        (lambda: exclusive_lock(afile).__enter__(), "afile"),
    ]
    for call, msg in cases:
        with pytest.raises(OutputError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    check_writable(tmp_path / "new" / "deeper" / "out.npy")  # creatable: no error, nothing created
    check_writable(tmp_path / "new", directory=True)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_an_error_naming_it(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="ro"):
            check_writable(ro / "out.npy")
        with pytest.raises(OutputError, match="ro"):
            save_json(ro / "x.json", {})
    finally:
        ro.chmod(0o755)


def test_jsonl_with_garbled_lines_is_read_and_the_problems_are_named(tmp_path):
    """issue 13 item 11: a 0xff byte used to raise UnicodeDecodeError and a line that is not an
    object broke every reader."""
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"step": 1}\n\xff\xfe\n[1, 2]\n3\n\n{"step": 2}\n{"step": 3, "lo')
    rows, problems = scan_jsonl(p)
    assert rows == [{"step": 1}, {"step": 2}]
    assert [q.split(":")[0] for q in problems] == ["line 2", "line 3", "line 4"]  # the torn last line is not a problem
    assert read_jsonl(p) == rows
    with pytest.raises(CheckpointError, match=r"m\.jsonl: line 2"):
        read_jsonl(p, strict=True)
    for content in (b"", b"\x00" * 64):  # empty, and a zero-filled file left by a crash
        p.write_bytes(content)
        assert read_jsonl(p, strict=True) == []


def test_stale_temporaries_of_files_and_of_staged_directories_are_removed(tmp_path):
    """A kill can leave a half-written file (.x.<rand>.tmp) or a half-built folder staged beside its
    target (.diffusers.export.tmp, by the pipeline export); both go, the rest stays."""
    from rectflow.engine.io import remove_stale_temporaries

    (tmp_path / ".a.json.123.tmp").write_text("{")
    staged = tmp_path / ".diffusers.export.tmp"
    (staged / "unet").mkdir(parents=True)
    (staged / "unet" / "config.json").write_text("{}")
    (tmp_path / "keep.json").write_text("{}")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".a.json.123.tmp", ".diffusers.export.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_tensor_metadata_strings_are_plain_and_other_values_json(tmp_path):
    from safetensors import safe_open

    from rectflow.engine.io import load_tensors, save_tensors

    path = tmp_path / "t.safetensors"
    save_tensors(path, {"x": torch.zeros(2)}, {"format": "rectflow.perflow.delta", "looks_like_json": "123", "windows": [0.0, 0.5, 1.0]})
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert raw["format"] == "rectflow.perflow.delta" and raw["looks_like_json"] == "123"  # no quotes of their own
    _, meta = load_tensors(path)
    assert meta == {"format": "rectflow.perflow.delta", "looks_like_json": "123", "windows": [0.0, 0.5, 1.0]}
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "old.safetensors"), metadata={"format": '"rectflow.perflow.delta"', "step": "100"})
    assert load_tensors(tmp_path / "old.safetensors")[1] == {"format": "rectflow.perflow.delta", "step": 100}  # files of earlier versions


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl"])
def test_run_files_that_are_symlinks_are_refused_not_followed(tmp_path, name):
    """issue 31 items 1-2: a planted run/.lock or run/metrics.jsonl symlink used to be followed (its target truncated or appended to)."""
    from rectflow.cli import main

    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (run / name).symlink_to(outside)
    code = main(["train", "--run", str(run), "--quiet", "--no-eval", "model.width=8", "model.depth=2", "train.steps=3", "train.log_every=1"])
    assert code == 2
    assert outside.read_text() == "precious\n"


def test_append_jsonl_and_the_lock_do_not_follow_symlinks(tmp_path):
    from rectflow.engine.io import append_jsonl, exclusive_lock
    from rectflow.errors import OutputError

    target = tmp_path / "target.txt"
    target.write_text("keep")
    (tmp_path / "log.jsonl").symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        append_jsonl(tmp_path / "log.jsonl", {"a": 1})
    d = tmp_path / "d"
    d.mkdir()
    (d / ".lock").symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        with exclusive_lock(d):
            pass
    assert target.read_text() == "keep"


def test_a_symlinked_metrics_log_is_refused_on_resume_before_any_step(tmp_path):
    """A metrics.jsonl link planted in a run that already trained was read through and replaced on resume."""
    from rectflow.cli import main

    run = tmp_path / "run"
    tiny = ["--quiet", "--no-eval", "model.width=8", "model.depth=2", "train.log_every=1", "train.ckpt_every=2"]
    assert main(["train", "--run", str(run), *tiny, "train.steps=2"]) == 0
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"step": 1, "steps": 1, "loss": 123.0}\\n')
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    assert main(["train", "--run", str(run), *tiny, "train.steps=4"]) == 2
    assert (run / "metrics.jsonl").is_symlink() and outside.read_text() == '{"step": 1, "steps": 1, "loss": 123.0}\\n'
