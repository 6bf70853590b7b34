"""Writes tiny archives in the real CIFAR-10 "python version" format, for tests and benches.

Batches are pickled the way the official files are (protocol 2, Python 2 style `str` for
bytes, numpy arrays via numpy.core.multiarray._reconstruct), so the restricted unpickler sees
exactly the globals a genuine batch holds.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BASE = "cifar-10-batches-py"


class Py2Pickler(pickle._Pickler):
    """Python 3 at protocol 2 writes bytes through _codecs.encode; Python 2 wrote BINSTRING."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def dumps_py2(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_batch(rng: np.random.Generator, per_class: int, label: str) -> dict:
    """A batch with `per_class` images of every class, shuffled. Each class has its own tint
    under heavy noise, so a model can learn the task and a broken loop shows."""
    labels = [c for c in range(len(CLASSES)) for _ in range(per_class)]
    rng.shuffle(labels)
    tints = np.array([[25 * c, 225 - 25 * c, 128] for c in labels], dtype=np.int64)
    noise = rng.integers(-60, 61, size=(len(labels), 3, 1024))
    rows = np.clip(tints[:, :, None] + noise, 0, 255).astype(np.uint8).reshape(len(labels), 3072)
    return {b"batch_label": label.encode(), b"labels": labels, b"data": rows,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}


def batch_members(seed: int = 0, per_class: int = 2) -> dict[str, bytes]:
    """Member name -> payload for a complete, valid archive."""
    rng = np.random.default_rng(seed)
    members = {f"data_batch_{k}": dumps_py2(make_batch(rng, per_class, f"training batch {k} of 5"))
               for k in range(1, 6)}
    members["test_batch"] = dumps_py2(make_batch(rng, per_class, "testing batch 1 of 1"))
    members["batches.meta"] = dumps_py2({b"num_cases_per_batch": per_class * 10,
                                         b"label_names": [c.encode() for c in CLASSES],
                                         b"num_vis": 3072})
    members["readme.html"] = b"<html>test archive</html>\n"
    return members


def write_tarball(path: Path, members: dict[str, bytes], base: str = BASE) -> str:
    """Write members under `base/` as a .tar.gz; returns its md5."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{base}/{name}" if base else name)
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


def unpickle_trusted(payload: bytes) -> dict:
    """Test-side reader of our own fixtures (trusted: we just wrote them)."""
    return pickle.loads(payload, encoding="bytes")


CIFAR100_FINE = [f"fine_{i}" for i in range(100)]  # stand-ins for apple, aquarium_fish, ...


def cifar100_members(seed: int = 0, per_class: int = 1) -> dict[str, bytes]:
    """A complete CIFAR-100 python archive's members: `train`, `test` and `meta` with
    `fine_labels` / `fine_label_names` (and the coarse ones, as the official files hold)."""
    rng = np.random.default_rng(seed)

    def batch(label: str) -> bytes:
        labels = [c for c in range(100) for _ in range(per_class)]
        rng.shuffle(labels)
        rows = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        return dumps_py2({b"batch_label": label.encode(), b"fine_labels": labels,
                          b"coarse_labels": [c // 5 for c in labels], b"data": rows,
                          b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]})

    return {"train": batch("training batch 1 of 1"), "test": batch("testing batch 1 of 1"),
            "meta": dumps_py2({b"fine_label_names": [c.encode() for c in CIFAR100_FINE],
                               b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]})}
