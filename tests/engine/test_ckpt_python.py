"""Opens a Zenith checkpoint the way a numpy or PyTorch user would, without Zenith and without the
safetensors package (Debian has none): json for the header, numpy.frombuffer or torch.frombuffer
for the tensors. ckpt_sample (argv[1]) writes the file with values from formulas; this test
computes them again and compares names, dtypes, shapes and every bit, and checks the file's
digest with hashlib. load_numpy is, line for line, the loader docs/checkpoints.md shows.

Usage: test_ckpt_python.py PATH_TO_CKPT_SAMPLE"""
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import torch

NUMPY_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8")}
TORCH_DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}


def read_header(raw):
    """The header (tensor entries and metadata) and the data section of a checkpoint's bytes."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    return header, meta, raw[8 + n:]


def load_numpy(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        array = np.frombuffer(data[begin:end], dtype=NUMPY_DTYPES[t["dtype"]])
        tensors[name] = array.reshape(t["shape"])
    return tensors, meta


def load_torch(path):
    with open(path, "rb") as f:
        header, meta, data = read_header(f.read())
    tensors = {}
    for name, t in header.items():
        begin, end = t["data_offsets"]
        dtype = TORCH_DTYPES[t["dtype"]]
        if begin == end:  # torch.frombuffer refuses an empty buffer
            tensors[name] = torch.empty(t["shape"], dtype=dtype)
        else:  # a bytearray per tensor: writable, as frombuffer wants, and aligned for its dtype
            tensor = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype)
            tensors[name] = tensor.reshape(t["shape"])
    return tensors, meta


def expected():
    """The sample's tensors, from the formulas ckpt_sample.c uses."""
    w = np.array([math.sin(0.001 * i) for i in range(3 * 5 * 7)], dtype=np.float64)
    return {
        "layer1.weight": ("F32", [3, 5, 7], w.astype(np.float32).reshape(3, 5, 7)),
        "layer1.bias": ("F64", [11], np.array([1.0 / (i + 1) for i in range(11)])),
        "zenith.step": ("I64", [], np.array(123456789012, dtype=np.int64)),
        "counts": ("I64", [4], np.array([(i * i - 5) * 1000000007 for i in range(4)], np.int64)),
        "empty": ("F32", [0, 3], np.zeros((0, 3), dtype=np.float32)),
    }


EXPECTED_META = {"zenith.job": "j-42", "zenith.step": "1200", "note": "café ✓"}


class CheckpointFromPython(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.path = os.path.join(cls.tmp.name, "sample.safetensors")
        out = subprocess.run([sys.argv[1], cls.path], check=True, capture_output=True, text=True)
        cls.digest, size = out.stdout.split()
        cls.size = int(size)
        with open(cls.path, "rb") as f:
            cls.raw = f.read()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def assert_bitwise_equal(self, name, got, want):
        self.assertEqual(got.dtype, want.dtype, name)
        self.assertEqual(list(got.shape), list(want.shape), name)
        self.assertEqual(got.tobytes(), want.tobytes(), f"{name}: {got} != {want}")

    def test_numpy_loader_reads_formula_values(self):
        tensors, _ = load_numpy(self.path)
        self.assertEqual(list(tensors), list(expected()))
        for name, (dtype, shape, want) in expected().items():
            self.assertEqual(tensors[name].dtype, NUMPY_DTYPES[dtype], name)
            self.assertEqual(list(tensors[name].shape), shape, name)
            self.assert_bitwise_equal(name, tensors[name], want)

    def test_torch_loader_reads_formula_values(self):
        tensors, _ = load_torch(self.path)
        self.assertEqual(list(tensors), list(expected()))
        for name, (dtype, shape, want) in expected().items():
            got = tensors[name]
            self.assertEqual(got.dtype, TORCH_DTYPES[dtype], name)
            self.assertEqual(list(got.shape), shape, name)
            self.assertTrue(torch.equal(got, torch.from_numpy(want.copy())), f"{name}: {got}")

    def test_metadata_is_as_written(self):
        _, meta = load_numpy(self.path)
        digest = meta.pop("zenith.sha256")
        self.assertEqual(digest, self.digest)
        self.assertEqual(meta, EXPECTED_META)

    def test_digest_is_sha256_of_file_with_digest_zeroed(self):
        header, meta, _ = read_header(self.raw)
        digest = meta["zenith.sha256"].encode()
        self.assertEqual(self.raw.count(digest), 1)
        zeroed = self.raw.replace(digest, b"0" * 64)
        self.assertEqual(hashlib.sha256(zeroed).hexdigest(), self.digest)

    def test_layout_is_packed_and_aligned(self):
        self.assertEqual(len(self.raw), self.size)
        n = int.from_bytes(self.raw[:8], "little")
        self.assertEqual((8 + n) % 8, 0, "data section not 8-byte aligned")
        text = self.raw[8:8 + n].decode()
        json_text = text.rstrip(" ")
        self.assertTrue(json_text.endswith("}"), "the header is padded with something but spaces")
        self.assertLess(len(text) - len(json_text), 8, "more padding than alignment needs")
        self.assertTrue(text.startswith('{"__metadata__":{"zenith.sha256":"'), text[:60])
        header, _, data = read_header(self.raw)
        at = 0
        for name, t in header.items():
            begin, end = t["data_offsets"]
            self.assertEqual(begin, at, f"{name} does not follow the previous tensor")
            size = NUMPY_DTYPES[t["dtype"]].itemsize * math.prod(t["shape"])
            self.assertEqual(end - begin, size, name)
            at = end
        self.assertEqual(at, len(data))


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
