"""Registry lookups and the resumable, checksummed downloader against a local HTTP server.

The server (127.0.0.1, port 0, one thread per request) mirrors the bucket layout
(``/models/DeepVariant/<ver>/…``), honours ``Range`` like GCS, and can be told to drop the
connection part-way through a file once, to ignore ``Range``, or to serve changed bytes, so
each recovery path of :mod:`weights.fetch` is exercised on real sockets.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import google_crc32c
import pytest
from typer.testing import CliRunner

import weights
from dvtorch.errors import DvprobeError
from weights.fetch import parse_sha256_overrides
from weights.registry import DEFAULT_BUCKET, TOOLS

NAME = "deepvariant-1.6.1-wgs-savedmodel"
CKPT = "deepvariant-1.7.0-wgs-checkpoint"


@dataclass
class ServerState:
    """What the handler serves and how it misbehaves; ``log`` records every response."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes, then hang up (once)
    ignore_range: bool = False
    # GCS's x-goog-hash: "md5+crc32c" (a plain object), "crc32c" (a composite one), or None
    goog_hash: str | None = None
    damage: dict[str, int] = field(default_factory=dict)  # path -> byte to flip in transit (once)
    extra_headers: dict[str, str] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests_for(self, suffix: str) -> list[dict]:
        return [r for r in self.log if r["path"].endswith(suffix)]


class _Handler(BaseHTTPRequestHandler):
    state: ServerState  # set on the per-server subclass

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        st = self.state
        rng = self.headers.get("Range")
        data = st.files.get(self.path)
        entry = {"path": self.path, "range": rng, "status": None, "sent": 0}
        with st.lock:
            st.log.append(entry)
        if data is None:
            entry["status"] = 404
            self.send_error(404, "Not Found")
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not st.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            entry["status"] = 206
        else:
            self.send_response(200)
            entry["status"] = 200
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        if st.goog_hash:  # the whole object's hashes, also on a ranged answer, like GCS
            self.send_header("x-goog-hash", f"crc32c={gcs_crc32c(data)}")
            if "md5" in st.goog_hash:
                self.send_header("x-goog-hash", f"md5={gcs_md5(data)}")
        for k, v in st.extra_headers.items():
            self.send_header(k, v)
        self.end_headers()
        flip = st.damage.pop(self.path, None)
        if flip is not None:
            body = body[:flip] + bytes([body[flip] ^ 0x01]) + body[flip + 1:]
        cut = st.drop_after.pop(self.path, None)
        if cut is not None:  # send part of the body, then hang up mid-file
            self.wfile.write(body[:cut])
            self.wfile.flush()
            entry["sent"] = cut
            self.close_connection = True
            return
        self.wfile.write(body)
        entry["sent"] = len(body)


@pytest.fixture
def server():
    """(base URL, state) of a throw-away mirror of the bucket on 127.0.0.1."""
    state = ServerState()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def publish(state: ServerState, entry: weights.ModelEntry, seed: int = 0) -> dict[str, bytes]:
    """Put pseudo-random contents for every file of ``entry`` on the mirror."""
    out = {}
    for i, f in enumerate(entry.files):
        size = 300_000 if "variables.data" in f or f.endswith(".data-00000-of-00001") else 1_000 + i
        blob = hashlib.sha256(f"{seed}:{f}".encode()).digest() * (size // 32 + 1)
        if f == "example_info.json":
            blob = json.dumps(
                {
                    "version": entry.version,
                    "shape": [100, 221, 7],
                    "channels": [1, 2, 3, 4, 5, 6, 19],
                }
            ).encode()
        out[f] = blob[:size] if f != "example_info.json" else blob
        state.files["/" + entry.bucket_path + f] = out[f]
    return out


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def gcs_md5(b: bytes) -> str:
    return base64.b64encode(hashlib.md5(b).digest()).decode()


def gcs_crc32c(b: bytes) -> str:
    return base64.b64encode(google_crc32c.value(b).to_bytes(4, "big")).decode()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's real cache or an ambient mirror setting."""
    monkeypatch.setenv("DVPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DVPROBE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DVPROBE_WEIGHTS_MIRROR", raising=False)


# --------------------------------------------------------------------------- registry


def test_registry_covers_every_release_and_type():
    names = {e.name for e in weights.list_models(fmt="savedmodel", tool="deepvariant")}
    versions = ("1.6.0", "1.6.1", "1.7.0", "1.8.0", "1.9.0", "1.10.0")
    for v in versions:
        for t in ("wgs", "wes", "pacbio", "hybrid", "ont"):
            assert f"deepvariant-{v}-{t}-savedmodel" in names
        assert (f"deepvariant-{v}-masseq-savedmodel" in names) == (v in versions[3:])
        assert (f"deepvariant-{v}-rnaseq-savedmodel" in names) == (v == "1.10.0")
    assert len(names) == 34


def test_every_1_10_model_type_is_listed_with_an_honest_tag():
    entries = weights.list_models(version="1.10.0", tool="deepvariant")
    assert {e.type for e in entries if e.format == "savedmodel"} == {
        "wgs", "wes", "pacbio", "hybrid", "ont", "masseq", "rnaseq"}
    by_type = {e.type: e for e in entries if e.format == "savedmodel"}
    # no stored upstream file names a 1.10.0 object: the 1.9.0 layout is *derived*, and the
    # RNASEQ bucket name was never seen at all
    assert {e.confidence for t, e in by_type.items() if t != "rnaseq"} == {"derived"}
    assert by_type["rnaseq"].confidence == "unknown"
    assert by_type["rnaseq"].model_type == "RNASEQ" and by_type["rnaseq"].shape is None
    assert by_type["pacbio"].shape == (100, 147, 10)
    assert by_type["wgs"].urls[0] == (
        "https://storage.googleapis.com/deepvariant/models/DeepVariant/1.10.0/savedmodels/"
        "deepvariant.wgs.savedmodel/saved_model.pb")
    ckpt = weights.get("deepvariant-1.10.0-wgs-checkpoint")
    assert ckpt.confidence == "3rd-party" and ckpt.base_url.endswith("/1.10.0/checkpoints/wgs/")


def test_deepsomatic_and_deeptrio_entries_follow_their_dockerfiles():
    ds = {e.type: e for e in weights.list_models(tool="deepsomatic")}
    assert {"wgs", "wes", "pacbio", "ont", "ffpe_wgs", "ffpe_wes", "wgs_tumor_only"} <= set(ds)
    assert ds["wes"].name == "deepsomatic-1.9.0-wes-savedmodel"
    assert ds["wes"].confidence == "verified" and ds["wgs"].confidence == "derived"
    assert ds["ont"].url("saved_model.pb") == (
        "https://storage.googleapis.com/deepvariant/models/DeepSomatic/1.9.0/savedmodels/"
        "deepsomatic.ont.savedmodel/saved_model.pb")
    assert all(e.shape is None for e in ds.values())  # only example_info.json says
    trio = weights.get("deeptrio-1.6.0-wgs_child-savedmodel")
    assert trio.base_url.endswith("/DeepTrio/1.6.0/savedmodels/deeptrio.wgs_child.savedmodel/")
    assert trio.release == "deeptrio-1.6.0-wgs_child"


def test_registry_entry_urls_files_and_confidence():
    e = weights.get(NAME)
    assert e.version == "1.6.1" and e.type == "wgs" and e.format == "savedmodel"
    assert e.files == (
        "saved_model.pb",
        "fingerprint.pb",
        "example_info.json",
        "variables/variables.data-00000-of-00001",
        "variables/variables.index",
    )
    assert e.urls[0] == (
        "https://storage.googleapis.com/deepvariant/models/DeepVariant/1.6.1/savedmodels/"
        "deepvariant.wgs.savedmodel/saved_model.pb"
    )
    assert e.shape == (100, 221, 7) and e.channels == (1, 2, 3, 4, 5, 6, 19)
    # tags copied from the reference sheet: 1.9.0 is read from the Dockerfile, 1.6.1 wgs only
    # in 3rd-party code, other 1.6.1 types are not established at all
    assert e.confidence == "3rd-party"
    assert weights.get("deepvariant-1.9.0-ont-savedmodel").confidence == "verified"
    assert weights.get("deepvariant-1.6.1-wes-savedmodel").confidence == "unknown"
    assert weights.get("deepvariant-1.8.0-masseq-savedmodel").confidence == "doc"
    assert weights.get("deepvariant-1.9.0-pacbio-savedmodel").shape == (100, 147, 10)
    assert weights.get("deepvariant-1.9.0-ont-savedmodel").shape is None  # [unknown]
    assert all(v is None for v in e.sha256.values())  # not known in advance
    assert e.url("saved_model.pb", "http://mirror:8/x/") == (
        "http://mirror:8/x/models/DeepVariant/1.6.1/savedmodels/deepvariant.wgs.savedmodel/"
        "saved_model.pb"
    )


def test_registry_checkpoints_and_convert_source(tmp_path):
    ckpts = weights.list_models(kind="wgs", fmt="checkpoint")
    assert [e.version for e in ckpts] == ["1.6.0", "1.6.1", "1.7.0", "1.8.0", "1.9.0", "1.10.0"]
    e = weights.get(CKPT)
    assert e.confidence == "doc"
    assert e.base_url.endswith("/1.7.0/checkpoints/wgs/")
    assert "deepvariant.wgs.ckpt.index" in e.files and "example_info.json" in e.files
    assert e.convert_source(tmp_path) == tmp_path / "deepvariant.wgs.ckpt"
    assert weights.get(NAME).convert_source(tmp_path) == tmp_path


def test_registry_filters_and_aliases():
    assert {e.type for e in weights.list_models(kind="HYBRID_PACBIO_ILLUMINA")} == {"hybrid"}
    assert {e.type for e in weights.list_models(kind="ont_r104")} == {"ont"}
    assert {e.version for e in weights.list_models(version="1.7.0")} == {"1.7.0"}
    with pytest.raises(weights.WeightsError, match="unknown version '1.5.0'"):
        weights.list_models(version="1.5.0")
    assert {e.tool for e in weights.list_models(version="1.9.0")} == {"deepvariant",
                                                                       "deepsomatic"}
    assert {e.tool for e in weights.list_models(version="1.9.0", tool="DeepSomatic")} == {
        "deepsomatic"}
    with pytest.raises(weights.WeightsError, match="unknown tool 'deepsomatik'"):
        weights.list_models(tool="deepsomatik")
    with pytest.raises(weights.WeightsError, match="unknown model type 'rna'"):
        weights.list_models(kind="rna")


def test_get_did_you_mean():
    assert weights.get(NAME.upper()).name == NAME
    with pytest.raises(weights.UnknownModelError, match=f"did you mean {NAME}"):
        weights.get("deepvariant-1.6.1-wgs")
    with pytest.raises(weights.UnknownModelError, match="did you mean .*1.6.1-wgs-savedmodel"):
        weights.get("deepvariant-1.6.1-wgs-savedmodle")
    with pytest.raises(weights.UnknownModelError) as info:
        weights.get("resnet50")
    assert "did you mean" not in str(info.value) and "dvprobe weights list" in str(info.value)
    assert isinstance(info.value, weights.WeightsError)


def test_default_dest_is_user_cache(tmp_path, monkeypatch):
    e = weights.get(NAME)
    assert weights.default_dest(e) == tmp_path / "cache" / NAME
    monkeypatch.delenv("DVPROBE_CACHE")
    monkeypatch.delenv("DVPROBE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.default_dest(e) == tmp_path / "xdg" / "dvprobe" / "weights" / NAME
    assert weights.default_bundle(e) == tmp_path / "xdg" / "dvprobe" / "bundles" / e.release


def test_downloads_and_bundles_share_one_cache_rule(tmp_path, monkeypatch):
    """$DVPROBE_HOME moves both; $DVPROBE_CACHE (older) still moves the downloads only."""
    e = weights.get("deepvariant-1.10.0-wgs-savedmodel")
    monkeypatch.delenv("DVPROBE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("DVPROBE_HOME", str(tmp_path / "home"))
    assert weights.default_dest(e) == tmp_path / "home" / "weights" / e.name
    assert weights.default_bundle(e) == tmp_path / "home" / "bundles" / "deepvariant-1.10.0-wgs"
    monkeypatch.setenv("DVPROBE_CACHE", str(tmp_path / "dl"))
    assert weights.default_dest(e) == tmp_path / "dl" / e.name
    assert weights.default_bundle(e) == tmp_path / "home" / "bundles" / "deepvariant-1.10.0-wgs"


def test_a_release_name_picks_its_best_established_format_and_typos_get_suggestions():
    assert [e.format for e in weights.release_entries("deepvariant-1.10.0-wgs")] == [
        "savedmodel", "checkpoint"]  # derived beats 3rd-party
    assert [e.format for e in weights.release_entries("deepvariant-1.7.0-wgs")] == [
        "checkpoint", "savedmodel"]  # doc beats derived
    assert [e.name for e in weights.release_entries("deepvariant-1.10.0-wgs-checkpoint")] == [
        "deepvariant-1.10.0-wgs-checkpoint"]
    with pytest.raises(weights.UnknownModelError, match="did you mean deepvariant-1.10.0-wgs"):
        weights.release_entries("deepvariant-1.10-wgs")
    assert weights.looks_like_release("deepsomatic-1.9.0-wes")
    assert not weights.looks_like_release("bundles/deepvariant-1.10.0-wgs")
    assert not weights.looks_like_release("my-bundle")


# --------------------------------------------------------------------------- fetch


def test_fetch_full_download_and_lock_file(server):
    base, state = server
    e = weights.get(NAME)
    blobs = publish(state, e)
    dest = weights.fetch(NAME, base_url=base, progress=False)
    assert dest == weights.default_dest(e)
    for f, blob in blobs.items():
        assert (dest / f).read_bytes() == blob
    assert not list(dest.rglob("*.part"))
    lock = json.loads((dest / "checksums.json").read_text())
    assert lock["name"] == NAME and lock["deepvariant_version"] == "1.6.1"
    assert lock["confidence"] == "3rd-party" and lock["convert_source"] == str(dest)
    assert set(lock["files"]) == set(e.files)
    for f, blob in blobs.items():
        rec = lock["files"][f]
        assert rec["sha256"] == sha(blob) and rec["size"] == len(blob)
        assert rec["url"] == base + e.bucket_path + f
        assert rec["verified_against"] == "trust-on-first-use"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rec["fetched"])
    assert weights.is_fetched(e)

    # a second fetch re-verifies the files against the lock and downloads nothing
    n = len(state.log)
    weights.fetch(NAME, base_url=base, progress=False)
    assert len(state.log) == n


def test_fetch_resumes_after_dropped_connection(server, tmp_path):
    base, state = server
    e = weights.get(NAME)
    blobs = publish(state, e)
    big = "variables/variables.data-00000-of-00001"
    path = "/" + e.bucket_path + big
    state.drop_after[path] = 123_457
    dest = tmp_path / "dl"
    with pytest.raises(weights.DownloadError, match="run the same fetch again to resume") as info:
        weights.fetch(NAME, dest, base_url=base, progress=False, retries=0)
    assert base + e.bucket_path + big in str(info.value)
    part = dest / (big + ".part")
    assert part.stat().st_size == 123_457 and not (dest / big).exists()

    weights.fetch(NAME, dest, base_url=base, progress=False)
    reqs = state.requests_for(big)
    assert [r["status"] for r in reqs] == [200, 206]
    assert reqs[1]["range"] == "bytes=123457-"
    assert reqs[1]["sent"] == len(blobs[big]) - 123_457  # only the remainder travelled
    assert (dest / big).read_bytes() == blobs[big] and not part.exists()
    lock = json.loads((dest / "checksums.json").read_text())
    assert lock["files"][big]["sha256"] == sha(blobs[big])  # hash spans both transfers


def test_fetch_retries_automatically_within_one_call(server, tmp_path):
    base, state = server
    e = weights.get(CKPT)
    blobs = publish(state, e)
    data = "deepvariant.wgs.ckpt.data-00000-of-00001"
    state.drop_after["/" + e.bucket_path + data] = 4096
    dest = weights.fetch(CKPT, tmp_path / "ck", base_url=base, progress=False)
    reqs = state.requests_for(data)
    assert [(r["status"], r["range"]) for r in reqs] == [(200, None), (206, "bytes=4096-")]
    assert (dest / data).read_bytes() == blobs[data]


def test_fetch_restarts_cleanly_when_server_ignores_range(server, tmp_path):
    base, state = server
    e = weights.get(NAME)
    blobs = publish(state, e)
    big = "variables/variables.data-00000-of-00001"
    state.drop_after["/" + e.bucket_path + big] = 50_000
    state.ignore_range = True
    dest = weights.fetch(NAME, tmp_path / "dl", base_url=base, progress=False)
    reqs = state.requests_for(big)
    assert [(r["status"], r["range"]) for r in reqs] == [(200, None), (200, "bytes=50000-")]
    assert reqs[1]["sent"] == len(blobs[big])  # whole file again ...
    assert (dest / big).read_bytes() == blobs[big]  # ... and not appended to the stale part
    lock = json.loads((dest / "checksums.json").read_text())
    assert lock["files"][big]["sha256"] == sha(blobs[big])


def test_fetch_completes_a_part_that_was_already_whole(server, tmp_path):
    """A crash between the last byte and the rename: the server answers 416, no re-download."""
    base, state = server
    e = weights.get(NAME)
    blobs = publish(state, e)
    dest = tmp_path / "dl"
    (dest / "variables").mkdir(parents=True)
    idx = "variables/variables.index"
    (dest / (idx + ".part")).write_bytes(blobs[idx])
    weights.fetch(NAME, dest, base_url=base, progress=False)
    assert [r["status"] for r in state.requests_for(idx)] == [416]
    assert (dest / idx).read_bytes() == blobs[idx]


def test_a_mirror_can_be_a_local_directory_but_not_a_bare_host(tmp_path):
    e = weights.get(NAME)
    state = ServerState()
    blobs = publish(state, e)
    root = tmp_path / "mirror"
    for path, blob in state.files.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_bytes(blob)
    dest = weights.fetch(NAME, base_url=str(root), progress=False)
    assert {f: (dest / f).read_bytes() for f in blobs} == blobs
    with pytest.raises(weights.DownloadError, match="not in the mirror .* keep the bucket's"):
        weights.fetch("deepvariant-1.6.1-wes-savedmodel", tmp_path / "wes", base_url=str(root),
                      progress=False)
    with pytest.raises(weights.WeightsError, match="not a URL .* and not a local directory"):
        weights.fetch(NAME, base_url="storage.example.org/deepvariant", progress=False)


def test_fetch_sha256_mismatch_deletes_file(server, tmp_path):
    base, state = server
    e = weights.get(NAME)
    publish(state, e)
    dest = tmp_path / "dl"
    with pytest.raises(weights.ChecksumError, match="sha256 mismatch for saved_model.pb") as info:
        weights.fetch(
            NAME, dest, base_url=base, progress=False, sha256={"saved_model.pb": "0" * 64}
        )
    assert "from user" in str(info.value) and "deleted" in str(info.value)
    assert not (dest / "saved_model.pb").exists() and not (dest / "saved_model.pb.part").exists()

    # a registry value is enforced the same way
    bad = replace(e, sha256={**e.sha256, "fingerprint.pb": "f" * 64})
    with pytest.raises(weights.ChecksumError, match="from registry"):
        weights.fetch(bad, tmp_path / "dl2", base_url=base, progress=False)
    assert not (tmp_path / "dl2" / "fingerprint.pb").exists()


def test_a_file_on_disk_that_does_not_match_is_kept_until_a_verified_one_replaces_it(
    server, tmp_path
):
    """A mistyped --sha256 (or a mirror that is down) must not cost a hand-copied file."""
    base, state = server
    e = weights.get(NAME)
    blobs = publish(state, e)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "saved_model.pb").write_bytes(blobs["saved_model.pb"])  # copied in by hand
    typo = {"saved_model.pb": "b" * 64}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(weights.DownloadError, match="connection refused") as info:
        weights.fetch(NAME, dest, base_url=f"http://127.0.0.1:{port}/", progress=False,
                      sha256=typo)
    assert f"does not match {'b' * 64} and was left as it is" in str(info.value)
    assert (dest / "saved_model.pb").read_bytes() == blobs["saved_model.pb"]
    with pytest.raises(weights.ChecksumError, match="from user") as info:
        weights.fetch(NAME, dest, base_url=base, progress=False, sha256=typo)
    assert "left as it is" in str(info.value)
    assert (dest / "saved_model.pb").read_bytes() == blobs["saved_model.pb"]
    # a corrupted file is replaced once a download matches the expected digest
    (dest / "saved_model.pb").write_bytes(b"bit rot")
    good = {"saved_model.pb": sha(blobs["saved_model.pb"])}
    weights.fetch(NAME, dest, base_url=base, progress=False, sha256=good)
    assert (dest / "saved_model.pb").read_bytes() == blobs["saved_model.pb"]


def test_fetch_correct_sha256_is_recorded_as_verified(server, tmp_path):
    base, state = server
    e = weights.get(NAME)
    blobs = publish(state, e)
    dest = weights.fetch(
        NAME,
        tmp_path / "dl",
        base_url=base,
        progress=False,
        sha256={"saved_model.pb": sha(blobs["saved_model.pb"]).upper()},
    )
    lock = json.loads((dest / "checksums.json").read_text())
    assert lock["files"]["saved_model.pb"]["verified_against"] == "user"


def test_fetch_trust_on_first_use_detects_changed_upstream(server, tmp_path):
    base, state = server
    e = weights.get(NAME)
    publish(state, e, seed=0)
    dest = weights.fetch(NAME, tmp_path / "dl", base_url=base, progress=False)
    publish(state, e, seed=1)  # upstream object replaced
    (dest / "saved_model.pb").unlink()
    with pytest.raises(weights.ChecksumError, match="checksums.json") as info:
        weights.fetch(NAME, dest, base_url=base, progress=False)
    assert "delete" in str(info.value) and not (dest / "saved_model.pb").exists()


def test_every_download_is_checked_against_the_hashes_google_states_for_the_object(
        server, tmp_path):
    """No registry digest is known, yet a first download from the bucket is not blind trust:
    GCS sends each object's MD5 and CRC32C (x-goog-hash, whole object, also when resumed)."""
    base, state = server
    e = weights.get(NAME)
    blobs = publish(state, e)
    state.goog_hash = "md5+crc32c"
    big = "variables/variables.data-00000-of-00001"
    state.drop_after["/" + e.bucket_path + big] = 70_001  # resumed: hash spans both transfers
    dest = weights.fetch(NAME, tmp_path / "dl", base_url=base, progress=False)
    assert [r["status"] for r in state.requests_for(big)] == [200, 206]
    lock = json.loads((dest / "checksums.json").read_text())
    for f, blob in blobs.items():
        rec = lock["files"][f]
        assert rec["verified_against"] == "server md5 (x-goog-hash)"
        assert rec["server_hash"] == {"md5": gcs_md5(blob), "crc32c": gcs_crc32c(blob)}
        assert rec["sha256"] == sha(blob)


def test_a_download_damaged_on_the_way_is_deleted_and_the_next_fetch_gets_it_right(
        server, tmp_path):
    base, state = server
    e = weights.get(NAME)
    blobs = publish(state, e)
    state.goog_hash = "md5+crc32c"
    big = "variables/variables.data-00000-of-00001"
    state.damage["/" + e.bucket_path + big] = 12_345
    dest = tmp_path / "dl"
    with pytest.raises(weights.ChecksumError, match=r"arrived damaged: its MD5 is .*x-goog-hash"
                       r".*run the same fetch again"):
        weights.fetch(NAME, dest, base_url=base, progress=False)
    assert not (dest / big).exists() and not (dest / (big + ".part")).exists()
    assert big not in json.loads((dest / "checksums.json").read_text())["files"]

    weights.fetch(NAME, dest, base_url=base, progress=False)  # the flip happened once
    assert (dest / big).read_bytes() == blobs[big]


def test_a_composite_object_is_checked_by_its_crc32c_alone(server, tmp_path):
    base, state = server
    e = weights.get(CKPT)
    publish(state, e)
    state.goog_hash = "crc32c"  # composite objects have no MD5
    data = "deepvariant.wgs.ckpt.data-00000-of-00001"
    state.damage["/" + e.bucket_path + data] = 7
    with pytest.raises(weights.ChecksumError, match="its CRC32C is"):
        weights.fetch(CKPT, tmp_path / "ck", base_url=base, progress=False)
    dest = weights.fetch(CKPT, tmp_path / "ck", base_url=base, progress=False)
    rec = json.loads((dest / "checksums.json").read_text())["files"][data]
    assert rec["verified_against"] == "server crc32c (x-goog-hash)"


def test_hashes_of_a_gzip_stored_object_served_decoded_are_not_compared(server, tmp_path):
    """GCS hashes the stored (compressed) bytes; a decoded answer cannot be checked by them."""
    base, state = server
    e = weights.get(NAME)
    publish(state, e)
    state.goog_hash = "md5+crc32c"
    state.extra_headers["x-goog-stored-content-encoding"] = "gzip"
    dest = weights.fetch(NAME, tmp_path / "dl", base_url=base, progress=False)
    recs = json.loads((dest / "checksums.json").read_text())["files"].values()
    assert {r["verified_against"] for r in recs} == {"trust-on-first-use"}
    assert all("server_hash" not in r for r in recs)


def test_server_hashes_reads_one_or_several_x_goog_hash_headers():
    from email.message import Message

    from weights.fetch import server_hashes

    two = Message()
    two["x-goog-hash"] = "crc32c=n03x6A=="
    two["x-goog-hash"] = "md5=Ojk9c3dhfxgoKVVHYwFbHQ=="
    one = Message()
    one["X-Goog-Hash"] = "crc32c=n03x6A==, md5=Ojk9c3dhfxgoKVVHYwFbHQ=="
    want = {"crc32c": "n03x6A==", "md5": "Ojk9c3dhfxgoKVVHYwFbHQ=="}
    assert server_hashes(two) == want and server_hashes(one) == want
    assert server_hashes(Message()) == {} and server_hashes(None) == {}


def test_fetch_404_names_url_and_confidence(server, tmp_path):
    base, state = server
    e = weights.get("deepvariant-1.6.1-wes-savedmodel")  # nothing published
    with pytest.raises(weights.DownloadError) as info:
        weights.fetch(e, tmp_path / "dl", base_url=base, progress=False)
    msg = str(info.value)
    assert "HTTP 404" in msg and base + e.bucket_path + "saved_model.pb" in msg
    assert "confidence 'unknown'" in msg


def test_fetch_connection_refused(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(weights.DownloadError, match="connection refused"):
        weights.fetch(NAME, tmp_path / "dl", base_url=f"http://127.0.0.1:{port}/", progress=False)


def test_fetch_mirror_env_variable(server, tmp_path, monkeypatch):
    base, state = server
    publish(state, weights.get(NAME))
    monkeypatch.setenv("DVPROBE_WEIGHTS_MIRROR", base)
    dest = weights.fetch(NAME, tmp_path / "dl")  # progress bars on: must not break anything
    assert (dest / "saved_model.pb").is_file()
    assert all(r["status"] == 200 for r in state.log)


def test_fetch_disk_write_error(server, tmp_path):
    base, state = server
    publish(state, weights.get(NAME))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(weights.DiskWriteError, match="cannot create download directory"):
        weights.fetch(NAME, blocker / "dl", base_url=base, progress=False)


def test_fetch_rejects_bad_overrides(tmp_path):
    with pytest.raises(weights.WeightsError, match="not a file of"):
        weights.fetch(NAME, tmp_path, sha256={"model.onnx": "0" * 64}, progress=False)
    with pytest.raises(weights.WeightsError, match="64 hex digits"):
        parse_sha256_overrides(["saved_model.pb=abc"])
    assert parse_sha256_overrides(["a=" + "AB" * 32]) == {"a": "ab" * 32}


def test_registry_default_urls_point_at_the_bucket():
    for e in weights.list_models():
        assert e.base_url.startswith(DEFAULT_BUCKET + f"models/{TOOLS[e.tool]}/{e.version}/")


# --------------------------------------------------------------------------- CLI


def _cli(*args: str):
    from cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_weights_list():
    res = _cli("weights", "list", "--version", "1.6.1", "--type", "wgs")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["NAME", "VERSION", "TYPE"]
    assert any(line.startswith(NAME) and "3rd-party" in line for line in lines)
    assert any(line.startswith("deepvariant-1.6.1-wgs-checkpoint") for line in lines)
    assert "2 model(s)" in res.output and "1.7.0" not in res.output

    res = _cli("weights", "list", "--json", "--type", "masseq")
    assert res.exit_code == 0
    assert {d["version"] for d in json.loads(res.output)} == {"1.8.0", "1.9.0", "1.10.0"}

    res = _cli("weights", "list", "--type", "rna")
    assert isinstance(res.exception, weights.WeightsError)


def test_cli_weights_fetch_prints_convert_command(server, tmp_path):
    base, state = server
    e = weights.get(CKPT)
    blobs = publish(state, e)
    dest = tmp_path / "ck"
    digest = sha(blobs["deepvariant.wgs.ckpt.index"])
    res = _cli(
        "weights",
        "fetch",
        CKPT,
        "--dest",
        str(dest),
        "--mirror",
        base,
        "--no-progress",
        "--sha256",
        f"deepvariant.wgs.ckpt.index={digest}",
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert f"dvprobe convert {dest / 'deepvariant.wgs.ckpt'} --out" in res.output
    assert "shape [100, 221, 7]" in res.output
    lock = json.loads((dest / "checksums.json").read_text())
    assert lock["files"]["deepvariant.wgs.ckpt.index"]["verified_against"] == "user"
    assert (f"(1 matched a known sha256, {len(e.files) - 1} recorded on first use (nothing to "
            "check against))") in res.output

    state.goog_hash = "md5+crc32c"
    res = _cli("weights", "fetch", CKPT, "--dest", str(tmp_path / "ck2"), "--mirror", base,
               "--no-progress")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert f"({len(e.files)} matched the server's own hash)" in res.output

    res = _cli("weights", "fetch", CKPT, "--dest", str(dest), "--sha256", "x=1")
    assert isinstance(res.exception, weights.WeightsError)


def test_cli_weights_list_shows_every_1_10_type_and_filters_by_tool():
    res = _cli("weights", "list", "--version", "1.10.0")
    assert res.exit_code == 0, res.output
    for t in ("wgs", "wes", "pacbio", "hybrid", "ont", "masseq", "rnaseq"):
        assert any(line.startswith(f"deepvariant-1.10.0-{t}-savedmodel")
                   for line in res.output.splitlines()), t
    rnaseq = next(line for line in res.output.splitlines() if "-rnaseq-" in line)
    assert rnaseq.split()[4:7] == ["json", "json", "unknown"]  # shape from example_info.json
    res = _cli("weights", "list", "--tool", "deepsomatic", "--type", "wes")
    assert res.exit_code == 0, res.output
    assert "deepsomatic-1.9.0-wes-savedmodel" in res.output and "1 model(s)" in res.output
    assert "deepvariant-" not in res.output


def test_cli_fetch_of_a_1_10_release_from_the_mirror(server):
    """A release name downloads its best-established format, checks it, and says how to
    convert it into the cache, where `dvprobe extract RELEASE` then finds it."""
    base, state = server
    e = weights.get("deepvariant-1.10.0-wgs-savedmodel")
    blobs = publish(state, e)
    state.goog_hash = "md5+crc32c"
    res = _cli("weights", "fetch", "deepvariant-1.10.0-wgs", "--mirror", base, "--no-progress")
    assert res.exit_code == 0, res.output + repr(res.exception)
    dest = weights.default_dest(e)
    assert all((dest / f).read_bytes() == b for f, b in blobs.items())
    assert f"({len(e.files)} matched the server's own hash)" in res.output
    assert all(r["path"].startswith("/models/DeepVariant/1.10.0/savedmodels/deepvariant.wgs.")
               for r in state.log)
    assert (f"dvprobe convert {dest} --out {weights.default_bundle(e)}") in res.output
    assert "dvprobe extract deepvariant-1.10.0-wgs EXAMPLES" in res.output
    res = _cli("weights", "list", "--version", "1.10.0", "--type", "wgs")
    assert res.output.splitlines()[1].split()[-1] == "yes"


def test_cli_fetch_convert_without_the_extra_says_what_to_install(server, monkeypatch):
    import importlib.util

    base, state = server
    publish(state, weights.get("deepvariant-1.10.0-wgs-savedmodel"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    res = _cli("weights", "fetch", "deepvariant-1.10.0-wgs", "--convert", "--mirror", base,
               "--no-progress")
    assert isinstance(res.exception, DvprobeError)
    assert "pip install 'dvprobe[convert]'" in str(res.exception)
    assert "tf2onnx" in str(res.exception)
    assert state.log == []  # refused before downloading anything


def test_cli_main_prints_one_line_errors(monkeypatch, capsys):
    import cli

    monkeypatch.setattr("sys.argv", ["dvprobe", "weights", "fetch", "deepvariant-1.6.1-wsg"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dvprobe: error: unknown model") and "did you mean" in err
    assert "Traceback" not in err


def test_releases_json_is_data_only():
    doc = json.loads((Path(weights.__file__).parent / "releases.json").read_text("utf-8"))
    assert doc["format"] == "dvprobe-weights-registry"
    assert set(doc["confidence_levels"]) == {"verified", "doc", "derived", "3rd-party", "unknown"}
    for m in doc["models"]:
        assert m["confidence"] in doc["confidence_levels"]
        assert all(f["sha256"] is None for f in m["files"])
