"""probing: examples I/O, activation extraction, reduction, clustering, annotation, reports."""

from probing.store import Store, open_store

__all__ = ["Store", "open_store", "capture"]


def __getattr__(name: str):
    # ``capture`` lives with the model code; imported lazily so that reading a STORE never
    # pays for importing torch.
    if name == "capture":
        from dvtorch.hooks import capture

        return capture
    raise AttributeError(name)
