"""Calibration samples for ``quantize``: token-id lists, one sample per forward.

* ``--calib FILE`` -- JSONL, one sample per line: ``{"text": "..."}`` (tokenized with the checkpoint's own
  tokenizer, no special tokens added) or ``{"input_ids": [...]}``. Blank lines are skipped.
* ``--calib builtin`` -- source code every machine has: the ``.py`` files of the running Python's standard
  library (``sysconfig`` ``stdlib`` path, tests and site-packages left out), in sorted path order, one file per
  sample. Deterministic for a given Python installation; nothing is downloaded.

Each sample is cut to ``seq_len`` tokens. The first ``num_samples`` samples calibrate; the next ``held_out``
(for ``--report``) are never seen by the calibration.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from trtllm_loop.errors import UserError

BUILTIN = "builtin"
MIN_TOKENS = 2  # a one-token sample exercises no attention


def builtin_texts(limit: int) -> list[tuple[str, str]]:
    """``(relative path, text)`` of the first ``limit`` stdlib sources of at least 2 KB, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/test" in f"/{rel}" or "idle_test" in rel:
            continue
        try:
            if f.stat().st_size < 2048:
                continue
            out.append((rel, f.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
        if len(out) >= limit:
            break
    if not out:
        raise UserError(f"--calib builtin: no Python standard-library sources found under {root}; pass "
                        "--calib FILE.jsonl instead")
    return out


def _tokenizer(ckpt: Path, why: str):
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(ckpt))
    except Exception as e:
        raise UserError(f"{ckpt}: {why} needs the checkpoint's tokenizer, which does not load ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]}); add the tokenizer files, or give --calib FILE.jsonl with "
                        '{"input_ids": [...]} lines') from None


def _records(path: Path) -> list[tuple[str, dict]]:
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: --calib file not found (give a JSONL file, or 'builtin')") from None
    except OSError as e:
        raise UserError(f"{path}: --calib cannot be read ({e.strerror or e}); give a JSONL file, or 'builtin'") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte {e.start}); --calib expects JSONL text") from None
    recs = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            r = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise UserError(f"{where}: not a JSON object ({e}); each line must be {{\"text\": ...}} or "
                            "{\"input_ids\": [...]}") from None
        if not isinstance(r, dict) or ("text" in r) == ("input_ids" in r):
            raise UserError(f"{where}: expected an object with exactly one of 'text' or 'input_ids'")
        recs.append((where, r))
    return recs


def calibration_samples(spec: str, ckpt: str | Path, vocab_size: int, num_samples: int, seq_len: int,
                        held_out: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """-> (calibration samples, held-out samples), token ids cut to ``seq_len``."""
    ckpt = Path(ckpt)
    if seq_len < MIN_TOKENS:
        raise UserError(f"--seq-len {seq_len}: a calibration sample needs at least {MIN_TOKENS} tokens (one token "
                        "exercises no attention); pass --seq-len 2 or more")
    need = num_samples + held_out
    if spec == BUILTIN:
        recs = [(f"builtin:{rel}", {"text": text}) for rel, text in builtin_texts(need)]
        origin = "--calib builtin (Python standard library)"
    else:
        recs = _records(Path(spec))
        origin = str(spec)
    tok = None
    samples = []
    for where, r in recs[:need]:
        if "text" in r:
            if not isinstance(r["text"], str):
                raise UserError(f"{where}: 'text' must be a string")
            tok = tok or _tokenizer(ckpt, f"{origin} (text samples)")
            ids = tok(r["text"], add_special_tokens=False, truncation=True, max_length=seq_len)["input_ids"]
        else:
            ids = r["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise UserError(f"{where}: 'input_ids' must be a list of integers")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise UserError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {vocab_size}) of {ckpt}")
            ids = ids[:seq_len]
        if len(ids) < MIN_TOKENS:
            raise UserError(f"{where}: sample has {len(ids)} token(s); a calibration sample needs at least "
                            f"{MIN_TOKENS} (remove the line or give longer text)")
        samples.append(list(ids))
    if len(samples) < need:
        extra = f" + {held_out} held out for --report" if held_out else ""
        raise UserError(f"{origin}: {len(samples)} usable calibration sample(s), but --num-samples {num_samples}"
                        f"{extra} needs {need}; add samples or lower --num-samples")
    return samples[:num_samples], samples[num_samples:]
