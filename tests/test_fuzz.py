"""Mutation fuzzer (issue 11 item 5): corrupt the config.json and the safetensors header of the real fixtures
(tests/data/golden, tests/fixtures/nvfp4) and run them through the readers and the CLI as a user would. Every
case must end in a correct load or a clean one-line error (UserError; exit 2 from the CLI), never another
exception type, a hang or a partial output.

CI runs a fixed seed and a bounded number of cases (well under a minute). A longer run:

    TRTLLM_LOOP_FUZZ_CASES=5000 TRTLLM_LOOP_FUZZ_SEED=1 .venv/bin/python -m pytest -q -p no:cacheprovider \\
        tests/test_fuzz.py

A failure prints the seed, the case number and the mutation, so it replays exactly."""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from trtllm_loop.errors import UserError

SEED = int(os.environ.get("TRTLLM_LOOP_FUZZ_SEED", "20240611"))
CASES = int(os.environ.get("TRTLLM_LOOP_FUZZ_CASES", "120"))
SOURCES = sorted([p for p in (REPO / "tests/data/golden").iterdir() if (p / "model.safetensors").is_file()] +
                 [p for p in (REPO / "tests/fixtures/nvfp4").iterdir() if (p / "model.safetensors").is_file()])
NASTY = [None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**30, -2**63, 0.5, -0.0, 1e308, 1e-320,
         float("nan"), float("inf"), float("-inf"), "", "x", "silu", "F32", "\udcff", [], [1], [1, -1], [[1]], {},
         {"a": 1}, {"rope_type": "default", "factor": "x"}, {"type": "linear", "factor": 2.0}]


def _nasty(rng: random.Random, like=None):
    if isinstance(like, int) and not isinstance(like, bool) and rng.random() < 0.5:
        return rng.choice([like + 1, like - 1, -like, like * 1000, like // 2, 0])
    if isinstance(like, list) and like and rng.random() < 0.5:
        v = list(like)
        op = rng.randrange(4)
        if op == 0:
            v.pop(rng.randrange(len(v)))
        elif op == 1:
            v.append(rng.choice(NASTY))
        elif op == 2:
            v[rng.randrange(len(v))] = rng.choice(NASTY)
        else:
            v.reverse()
        return v
    return rng.choice(NASTY)


def _mutate_obj(rng: random.Random, obj, depth=0):
    """One structural mutation somewhere in a JSON value (returns the new value)."""
    if isinstance(obj, dict) and obj and (depth == 0 or rng.random() < 0.7):
        key = rng.choice(sorted(obj))
        op = rng.randrange(5)
        obj = dict(obj)
        if op == 0:
            del obj[key]
        elif op == 1:
            obj[key] = _nasty(rng, obj[key])
        elif op == 2:
            obj[key] = _mutate_obj(rng, obj[key], depth + 1)
        elif op == 3:
            obj[rng.choice(["extra", key + "_", "__metadata__", "dtype"])] = _nasty(rng)
        else:
            other = rng.choice(sorted(obj))
            obj[key], obj[other] = obj[other], obj[key]
        return obj
    if isinstance(obj, list) and obj and rng.random() < 0.7:
        return _nasty(rng, obj)
    return _nasty(rng, obj)


def _mutate_bytes(rng: random.Random, b: bytes) -> bytes:
    b = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        i = rng.randrange(max(len(b), 1))
        if op == 0 and b:
            b[i % len(b)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = rng.choice([b"\xff", b"\x00", b"{", b'"', b"]", b",", b"-", b"9" * 30, b"\xc3"])
        elif op == 2:
            del b[i:i + rng.randint(1, 8)]
        else:
            b = b[:i]
    return bytes(b)


def _split(path: Path) -> tuple[int, bytes, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n], raw[8 + n:]


def make_case(rng: random.Random, dst: Path) -> str:
    """Copy a random fixture to ``dst`` and corrupt its config.json or its safetensors header; returns what was
    done (for the failure message)."""
    src = rng.choice(SOURCES)
    shutil.copytree(src, dst)
    target = rng.choice(["config", "config", "header", "header", "header", "length"])
    if target == "config":
        p = dst / "config.json"
        if rng.random() < 0.7:
            new = json.dumps(_mutate_obj(rng, json.loads(p.read_text())), allow_nan=True,
                             ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        else:
            new = _mutate_bytes(rng, p.read_bytes())
        p.write_bytes(new)
        return f"{src.name}: config.json -> {new[:300]!r}"
    st = dst / "model.safetensors"
    n, head, data = _split(st)
    if target == "length":
        n2 = rng.choice([0, 1, n - 1, n + 1, n + 8, len(head) + len(data) + 8, 2**63, 2**64 - 1])
        st.write_bytes(struct.pack("<Q", n2) + head + data)
        return f"{src.name}: header length {n} -> {n2}"
    if rng.random() < 0.75:
        h = json.loads(head)
        new = json.dumps(_mutate_obj(rng, h), allow_nan=True).encode("utf-8", "surrogatepass")
    else:
        new = _mutate_bytes(rng, head)
    st.write_bytes(struct.pack("<Q", len(new)) + new + data)
    return f"{src.name}: header -> {new[:300]!r}..."


def _no_leftovers(parent: Path, out: Path) -> None:
    assert not out.exists(), "partial output"
    assert not [p for p in parent.iterdir() if p.name.startswith(".")], "temp dir left behind"


def test_fuzz_readers_and_cli(tmp_path, capsys):
    from trtllm_loop.checkpoint import load_checkpoint
    from trtllm_loop.checkpoint.validate import validate
    from trtllm_loop.cli import main
    from trtllm_loop.config import LoopConfig

    rng = random.Random(SEED)
    ids = tmp_path / "ids.json"
    ids.write_text("[1, 2, 3, 4]")
    t_end = time.monotonic() + float(os.environ.get("TRTLLM_LOOP_FUZZ_SECONDS", "1e9"))
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        if time.monotonic() > t_end:
            break
        work = tmp_path / f"c{case}"
        work.mkdir()
        ck = work / "ck"
        what = make_case(rng, ck)
        tag = f"seed {SEED} case {case}: {what}"
        t0 = time.monotonic()
        for op in ("config", "load", "validate"):
            try:
                if op == "config":
                    LoopConfig.from_file(ck)
                elif op == "load":
                    sd = load_checkpoint(ck).state_dict
                    assert all(v.is_floating_point() for k, v in sd.items() if k.endswith(".weight")), tag
                else:
                    for f in validate(ck):
                        assert f.level in ("error", "warning") and f.message, tag
            except UserError as e:
                assert str(e).strip(), tag
            except Exception as e:  # noqa: BLE001  -- the point of the test
                pytest.fail(f"{tag}\n  {op}: {type(e).__name__}: {e}")
        out = work / "out"
        capsys.readouterr()
        rc = main(["logits", str(ck), "--ids", str(ids), "--ids", str(ids), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc in (0, 2), f"{tag}\n  logits rc {rc}: {err}"
        assert "Traceback" not in err and "internal error" not in err, f"{tag}\n  {err}"
        if rc == 2:
            assert err.startswith("error: "), f"{tag}\n  {err}"
            _no_leftovers(work, out)
            outcomes["refused"] += 1
        else:
            vocab = LoopConfig.from_file(ck).vocab_size
            arrs = [np.load(out / f"{i}.npy") for i in range(2)]
            assert all(a.shape == (4, vocab) for a in arrs), tag
            outcomes["loaded"] += 1
        assert time.monotonic() - t0 < 20, f"{tag}: took {time.monotonic() - t0:.1f} s"
        shutil.rmtree(work)
    assert outcomes["refused"] > 0 and sum(outcomes.values()) > 0
    print(f"fuzz: seed {SEED}, {sum(outcomes.values())} cases, {outcomes}")
