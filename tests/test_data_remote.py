"""``cellmae shard`` from object storage: a real S3 API served on 127.0.0.1 by the test (moto), and fsspec's HTTP.

No reader is monkeypatched: the plate is uploaded with s3fs to moto's threaded S3 server and sharded through
the same code a user's ``s3://`` URL takes.
"""

from __future__ import annotations

import gzip
import http.server
import importlib.util
import json
import threading

import pandas as pd
import pyarrow.parquet as pq
import pytest

from hf_cellmae.cli import main
from tests.helpers.data_fixtures import make_rxrx_plate, write_plate_metadata

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
BUCKET = "plates"


@pytest.fixture(scope="module")
def s3():
    """An S3 API on 127.0.0.1 (moto's ThreadedMotoServer) with an empty bucket; yields the storage options."""
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}"}
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    yield options
    server.stop()


@pytest.fixture
def plate(tmp_path, s3):
    """A 2-plate RxRx folder and its metadata on disk, and the same files uploaded to s3://plates/<test>/."""
    import s3fs

    fields = make_rxrx_plate(tmp_path / "screen" / "images", plates=2, wells=("A01", "B02"), sites=2)
    write_plate_metadata(tmp_path / "screen" / "meta.csv", fields)
    prefix = f"{BUCKET}/{tmp_path.name}"
    s3fs.S3FileSystem(**s3).put(str(tmp_path / "screen"), prefix, recursive=True)
    return tmp_path, f"s3://{prefix}", fields


def _shard(source, out, *extra):
    return main(
        [
            "shard",
            str(source),
            str(out),
            "--layout",
            "rxrx",
            "--shard-size",
            "10KB",
            "--num-workers",
            "1",
            "--quiet",
            *extra,
        ]
    )


def _rows(folder):
    """Every shard's rows in order, the source files aside: {file: [row without 'files' and 'row_crc32']}, and the
    files per row."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows, files = {}, []
    for shard in manifest["shards"]:
        table = pq.read_table(folder / shard["file"]).to_pylist()
        files += [row.pop("files") for row in table]
        for row in table:  # the row checksum covers the source files too, so it differs where they do
            row.pop("row_crc32")
        rows[shard["file"]] = table
    return manifest, rows, files


def test_a_plate_in_s3_shards_to_the_same_fields_and_manifest_as_the_plate_on_disk(plate, s3):
    tmp_path, url, fields = plate
    local = tmp_path / "screen"
    assert _shard(local / "images", tmp_path / "disk", "--metadata", str(local / "meta.csv")) == 0
    assert (
        _shard(f"{url}/images/", tmp_path / "s3", "--metadata", f"{url}/meta.csv", "--storage-options", json.dumps(s3))
        == 0
    )
    disk_manifest, disk_rows, disk_files = _rows(tmp_path / "disk")
    s3_manifest, s3_rows, s3_files = _rows(tmp_path / "s3")
    assert s3_rows == disk_rows  # pixels, CRC-32, ids, channels, joined metadata: row for row, shard for shard
    assert s3_files == [[name.replace(str(local), url) for name in names] for names in disk_files]
    assert s3_files[0][0].startswith(f"{url}/images/exp/Plate")  # the records name the objects by URL
    # the manifests differ only where they name the source (and so in the shards' byte counts and digests)
    different = {"source", "total_bytes", "shards", "metadata"}
    assert {k: v for k, v in s3_manifest.items() if k not in different} == {
        k: v for k, v in disk_manifest.items() if k not in different
    }
    assert [{k: s[k] for k in ("file", "num_fields", "row_groups")} for s in s3_manifest["shards"]] == [
        {k: s[k] for k in ("file", "num_fields", "row_groups")} for s in disk_manifest["shards"]
    ]
    assert json.dumps(s3_manifest["metadata"]).replace(url, "") == json.dumps(disk_manifest["metadata"]).replace(
        str(local), ""
    )
    assert s3_manifest["num_fields"] == len(fields) == 8 and "key" not in json.dumps(s3_manifest["options"])


def test_the_listing_is_done_once_and_recorded_for_reruns_and_other_parts(plate, s3, tmp_path):
    import s3fs

    _, url, fields = plate
    options = ["--storage-options", json.dumps(s3)]
    assert _shard(f"{url}/images", tmp_path / "s3", *options) == 0
    listing = json.loads((tmp_path / "s3" / "_source_listing.json").read_text())
    assert listing["url"] == f"{url}/images" and listing["num_objects"] == len(fields) * 3
    s3fs.S3FileSystem(**s3).pipe(f"{url[5:]}/images/exp/Plate9/A01_s1_w1.png", b"added after the listing")
    assert _shard(f"{url}/images", tmp_path / "s3", *options) == 0  # the recorded listing: the new object is not seen
    assert json.loads((tmp_path / "s3" / "manifest.json").read_text())["num_skipped"] == 0


def test_a_gzipped_load_data_csv_in_s3_with_url_path_names_reads_the_objects(plate, s3, tmp_path):
    import s3fs

    _, url, fields = plate
    lines = [
        "FileName_DNA,PathName_DNA,FileName_ER,PathName_ER,FileName_RNA,PathName_RNA,Metadata_Plate,Metadata_Well,Metadata_Site"
    ]
    for field_id in sorted(fields):
        _, plate_name, well, site = field_id.split("/")
        folder = f"{url}/images/exp/{plate_name}"
        lines.append(
            ",".join(f"{well}_{site}_w{c}.png,{folder}" for c in (1, 2, 3)) + f",{plate_name},{well},{site[1:]}"
        )
    s3fs.S3FileSystem(**s3).pipe(
        f"{url[5:]}/load_data.csv.gz", gzip.compress(("\n".join(lines) + "\n").encode())
    )  # as JUMP's
    assert (
        main(
            [
                "shard",
                f"{url}/load_data.csv.gz",
                str(tmp_path / "ld"),
                "--layout",
                "load_data",
                "--num-workers",
                "1",
                "--quiet",
                "--storage-options",
                json.dumps(s3),
            ]
        )
        == 0
    )
    manifest, rows, files = _rows(tmp_path / "ld")
    assert manifest["num_fields"] == len(fields) and manifest["channels"] == ["DNA", "ER", "RNA"]
    pixels = {row["field_id"]: row["pixels"] for shard in rows.values() for row in shard}
    for field_id, array in fields.items():
        assert pixels[field_id.split("/", 1)[1]] == array.tobytes()


def test_a_refused_read_stops_the_run_in_one_line_naming_the_object_and_the_fix(plate, s3, tmp_path, capsys):
    _, url, _ = plate
    anonymous = {
        "anon": True,
        "endpoint_url": s3["endpoint_url"],
    }  # moto lists for anyone, reads only for signed requests
    assert _shard(f"{url}/images", tmp_path / "out", "--storage-options", json.dumps(anonymous)) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"access to {url}/images/exp/Plate1/A01_s1_w1.png is refused" in error
    assert "give credentials in --storage-options" in error


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_a_missing_protocol_package_is_one_line_naming_the_extra(tmp_path, capsys):
    assert main(["shard", "gs://a-bucket/plate/", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "gs:// URLs" in error and "pip install 'hf-cellmae[gcs]'" in error


def test_malformed_storage_options_are_one_line_with_an_example(tmp_path, capsys):
    assert (
        main(["shard", "s3://plates/x/", str(tmp_path / "out"), "--storage-options", "{anon: true}", "--quiet"]) == 2
    )
    error = capsys.readouterr().err
    assert (
        "storage options '{anon: true}' (--storage-options) are not JSON" in error
        and """write e.g. --storage-options '{"anon": true}'""" in error
    )
    assert not (tmp_path / "out").exists()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first two GETs, then the body (an object store throttling, then recovering)."""

    requests = 0

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).requests += 1
        if type(self).requests <= 2:
            self.send_response(503)
            self.end_headers()
            return
        body = b"pixels"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_reads_are_retried_with_backoff_on_transient_errors_and_a_final_failure_names_the_object():
    from hf_cellmae.data.remote import read_bytes

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/plate/A01_s1_w1.png"
    try:
        assert read_bytes(url, retries=3, backoff_s=0.01) == b"pixels"
        assert _Flaky.requests == 3
        _Flaky.requests = 0
        with pytest.raises(OSError, match=r"cannot read http://127\.0\.0\.1:\d+/plate/A01_s1_w1\.png after 2 tries"):
            read_bytes(url, retries=2, backoff_s=0.01)
    finally:
        server.shutdown()


def test_cellmae_embed_reads_a_shard_folder_in_s3_to_the_table_of_the_same_shards_on_disk(plate, s3, tmp_path):
    import s3fs

    from hf_cellmae.evaluation.report import read_embeddings

    local, url, fields = plate
    assert (
        _shard(local / "screen" / "images", tmp_path / "shards", "--metadata", str(local / "screen" / "meta.csv")) == 0
    )
    s3fs.S3FileSystem(**s3).put(str(tmp_path / "shards"), f"{url[5:]}/shards", recursive=True)
    embed = ["embed", "pixel_stats", "--no-progress", "--num-workers", "1"]
    assert main([*embed[:2], str(tmp_path / "shards"), str(tmp_path / "from_disk"), *embed[2:]]) == 0
    assert (
        main([*embed[:2], f"{url}/shards", str(tmp_path / "from_s3"), *embed[2:], "--storage-options", json.dumps(s3)])
        == 0
    )
    from_s3 = read_embeddings(tmp_path / "from_s3")
    assert len(from_s3) == len(fields) and from_s3["Metadata_perturbation"].notna().all()
    pd.testing.assert_frame_equal(from_s3, read_embeddings(tmp_path / "from_disk"))
    info = json.loads((tmp_path / "from_s3" / "_embedding_info.json").read_text())
    assert info["source"]["path"] == f"{url}/shards" and "secret" not in json.dumps(info)


def test_cellmae_embed_of_an_image_folder_in_s3_says_to_shard_it_first(plate, s3, tmp_path, capsys):
    _, url, _ = plate
    code = main(["embed", "pixel_stats", f"{url}/images", str(tmp_path / "emb"), "--storage-options", json.dumps(s3)])
    assert code != 0
    assert f"shard it first: cellmae shard {url}/images SHARDS" in capsys.readouterr().err
