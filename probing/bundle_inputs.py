"""Pileups from DeepVariant examples, checked against the input a BUNDLE takes.

Why here and not in :mod:`dvtorch.verify`: the model package sits below the examples
package (docs/architecture.md, "Layers and import rules"), so verification takes arrays
and the reading happens up here. ``dvprobe verify --examples`` and Python callers alike::

    from dvtorch.verify import verify
    from probing.bundle_inputs import read_pileups

    report = verify(bundle, images=read_pileups(spec, bundle, 8), inputs=f"examples {spec}")
"""

from __future__ import annotations

import os

import numpy as np

from dvtorch.bundle import read_meta
from dvtorch.errors import ExampleFormatError
from probing.examples import check_example_info, read_example_info, read_examples


def read_pileups(examples: str, bundle: str | os.PathLike, limit: int) -> np.ndarray:
    """The first ``limit`` images of an examples spec as uint8 ``[N, H, W, C]``, refused
    (:class:`~dvtorch.errors.ExampleFormatError`) unless they are what ``bundle`` takes.

    The examples' example_info.json, when there is one, must give the bundle's shape and
    channel list (the check ``extract`` makes), said before any record is read. Why the
    channels: the reader only sees each record's shape, and examples with the right number
    of channels in another order or of another kind would be compared all the same, parity
    on inputs the model was never meant to see. Without an example_info.json only the shape
    can be and is checked, by the reader.
    """
    meta = read_meta(bundle)
    shape = tuple(int(v) for v in meta["input_shape"])
    channels = meta.get("channels")
    info = read_example_info(examples)
    if info is not None:
        check_example_info(info, shape=shape, channels=list(channels) if channels else None)
    images = [np.array(ex.image, dtype=np.uint8)
              for ex in read_examples(examples, limit=limit, expected_shape=shape)]
    if not images:
        raise ExampleFormatError(examples, None, "no examples found")
    return np.stack(images)
