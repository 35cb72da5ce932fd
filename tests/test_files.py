"""dvtorch.files: the one streamed sha256 used by conversion, bundles, downloads and STOREs."""

import hashlib

from dvtorch.files import CHUNK, sha256_file


def test_sha256_file_equals_hashlib_across_chunk_boundaries(tmp_path):
    for size in (0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 7):
        data = bytes((i * 31 + size) % 251 for i in range(size))
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()
        assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()
