"""Bad input never costs data or shows a traceback (issue 11): every command's output goes through
fsutil.atomic_dir / atomic_file (a marker, protected paths, locked temp dirs cleaned by the next run), every user
mistake is one `error:` line naming the file/field/flag, and the checkpoint readers refuse what they cannot
trust. The fuzzer over real fixtures is tests/test_fuzz.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, golden
from trtllm_loop.cli import main
from trtllm_loop.errors import UserError
from trtllm_loop.fsutil import MARKER, atomic_dir

CASE = "s1_gqa4x2_w8_T29"


def cli(*args):
    return main([str(a) for a in args])


def run_cli(capsys, *args):
    """(rc, stderr + stdout); asserts no traceback and no internal error."""
    capsys.readouterr()
    rc = cli(*args)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "internal error" not in cap.err, cap.err
    return rc, cap.err + cap.out


def tree(p: Path) -> dict:
    """Every file under p with its bytes (to prove nothing was touched)."""
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


@pytest.fixture
def ck(tmp_path):
    """A copy of the golden case s1 (dense fp32, one shard) plus an ids file."""
    d, ids, _ = golden(CASE)
    dst = tmp_path / "ck"
    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy2(d / f, dst / f)
    (tmp_path / "a.json").write_text(json.dumps(ids[:6]))
    (tmp_path / "b.json").write_text(json.dumps(ids[:4]))
    return dst


def raw_header(path: Path) -> tuple[dict, bytes]:
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return json.loads(b[8:8 + n]), b[8 + n:]


def write_raw(path: Path, header, data: bytes) -> None:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


# ------------------------------------------------------------------------------------------ 1. no data loss
def test_logits_out_dot_never_empties_the_working_directory(ck, tmp_path, capsys, monkeypatch):
    """The reported data loss: `logits --out .` emptied the working directory, then crashed."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    (work / "sub" / "x.bin").write_bytes(b"\0\1")
    before = tree(work)
    monkeypatch.chdir(work)
    for extra in ((), ("--force",)):
        rc, err = run_cli(capsys, "logits", ck, "--ids", tmp_path / "a.json", "--ids", tmp_path / "b.json",
                          "--out", ".", *extra)
        assert rc == 2 and "error: .: refusing to write here, it is the current directory" in err
        assert tree(work) == before
    rc, err = run_cli(capsys, "logits", ck, "--ids", tmp_path / "a.json", "--ids", tmp_path / "b.json",
                      "--out", "..", "--force")
    assert rc == 2 and "it contains the current directory" in err and tree(work) == before


def test_force_replaces_only_own_outputs(ck, tmp_path, capsys):
    ids = ("--ids", tmp_path / "a.json", "--ids", tmp_path / "b.json")
    foreign = tmp_path / "foreign"
    (foreign / "d").mkdir(parents=True)
    (foreign / "d" / "f.txt").write_text("mine")
    before = tree(foreign)
    rc, err = run_cli(capsys, "logits", ck, *ids, "--out", foreign)
    assert rc == 2 and f"error: {foreign}: already exists; choose a new path or pass --force" in err
    rc, err = run_cli(capsys, "logits", ck, *ids, "--out", foreign, "--force")
    assert rc == 2 and f"not written by trtllm-loop (no {MARKER} marker)" in err and tree(foreign) == before
    # every writing command refuses the same way (one helper)
    for args in (("synth", foreign, "--force", "--no-tokenizer"),
                 ("convert", ck, foreign, "--to", "bf16", "--force"),
                 ("validate", REPO / "tests/fixtures/nvfp4/modelopt_nvfp4", "--fix-fused-scales", foreign, "--force")):
        rc, err = run_cli(capsys, *args)
        assert rc == 2 and "not written by trtllm-loop" in err, args
        assert tree(foreign) == before
    # our own output: refused without --force, replaced with it
    own = tmp_path / "own"
    assert cli("logits", ck, *ids, "--out", own) == 0 and (own / MARKER).is_file()
    rc, err = run_cli(capsys, "logits", ck, *ids, "--out", own)
    assert rc == 2 and "already exists" in err
    (own / "0.npy").write_bytes(b"stale")
    assert cli("logits", ck, *ids, "--out", own, "--force") == 0
    assert (own / "0.npy").read_bytes()[:6] == b"\x93NUMPY"
    # a single .npy: replaced with --force only when it is a .npy (what logits writes)
    one = tmp_path / "one.npy"
    one.write_text("not numpy")
    rc, err = run_cli(capsys, "logits", ck, "--ids", tmp_path / "a.json", "--out", one)
    assert rc == 2 and "already exists" in err
    rc, err = run_cli(capsys, "logits", ck, "--ids", tmp_path / "a.json", "--out", one, "--force")
    assert rc == 2 and "is not a trtllm-loop output" in err and one.read_text() == "not numpy"
    one.unlink()
    assert cli("logits", ck, "--ids", tmp_path / "a.json", "--out", one) == 0
    assert cli("logits", ck, "--ids", tmp_path / "a.json", "--out", one, "--force") == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_force_never_touches_the_checkpoint_root_or_home(ck, tmp_path, capsys, monkeypatch):
    ids = ("--ids", tmp_path / "a.json", "--ids", tmp_path / "b.json")
    (ck / MARKER).write_text("{}")  # even a marker does not make the input replaceable
    before = tree(ck)
    for out, why in ((ck, "it is the input checkpoint"), (tmp_path, "it contains the input"),
                     (Path("/"), "it is the filesystem root")):
        rc, err = run_cli(capsys, "logits", ck, *ids, "--out", out, "--force")
        assert rc == 2 and why in err, (out, err)
        rc, err = run_cli(capsys, "convert", ck, out, "--to", "bf16", "--force")
        assert rc == 2 and why in err, (out, err)
    assert tree(ck) == before
    home = tmp_path / "home"
    home.mkdir()
    (home / MARKER).write_text("{}")
    (home / "dotfile").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    rc, err = run_cli(capsys, "synth", home, "--force", "--no-tokenizer")
    assert rc == 2 and "it is your home directory" in err and (home / "dotfile").is_file()


def test_overwrite_through_a_symlink_is_refused(ck, tmp_path, capsys):
    target = tmp_path / "target"
    assert cli("synth", target, "--dtype", "float32") == 0
    before = tree(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    rc, err = run_cli(capsys, "synth", link, "--overwrite", "--no-tokenizer")
    assert rc == 2 and "is a symbolic link" in err
    rc, err = run_cli(capsys, "triton-repo", "--flavour", "reference", "--model", target, "--out", link,
                      "--overwrite")
    assert rc == 2 and "is a symbolic link" in err
    assert link.is_symlink() and tree(target) == before


def test_triton_repo_overwrite_refuses_foreign_content(tmp_path, capsys):
    m = tmp_path / "m"
    assert cli("synth", m, "--dtype", "float32") == 0
    foreign = tmp_path / "repo"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    rc, err = run_cli(capsys, "triton-repo", "--flavour", "reference", "--model", m, "--out", foreign, "--overwrite")
    assert rc == 2 and "not written by trtllm-loop" in err and (foreign / "keep.txt").read_text() == "x"


# ------------------------------------------------------------------------------------------ 2. one-line errors
def _bad_utf8_config(ck):
    (ck / "config.json").write_bytes((ck / "config.json").read_bytes().replace(b'"silu"', b'"sil\xff"'))


def _cfg(**kw):
    def edit(ck):
        d = json.loads((ck / "config.json").read_text())
        d.update(kw)
        (ck / "config.json").write_text(json.dumps(d))
    return edit


def _header(edit):
    def go(ck):
        h, data = raw_header(ck / "model.safetensors")
        write_raw(ck / "model.safetensors", edit(h), data)
    return go


def _entry(name, **kw):
    def edit(h):
        h[name].update(kw)
        for k, v in kw.items():
            if v is None:
                del h[name][k]
        return h
    return _header(edit)


def _sharded(ck, weight_map_edit=None, index_text=None):
    """Split the single file into two shards + index; optionally edit the weight map or replace the index."""
    sd = load_file(str(ck / "model.safetensors"))
    names = sorted(sd)
    (ck / "model.safetensors").unlink()
    wm = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in part}, str(ck / fn))
        wm.update({n: fn for n in part})
    if weight_map_edit:
        weight_map_edit(wm)
    idx = index_text if index_text is not None else json.dumps({"metadata": {"total_size": 1}, "weight_map": wm})
    (ck / "model.safetensors.index.json").write_text(idx)


EMB = "model.embed_tokens.weight"
CORRUPT = {  # name -> (edit, substring of the error)
    "config-not-utf8": (_bad_utf8_config, "config.json: not valid UTF-8"),
    "rope-factor-str": (_cfg(rope_scaling={"rope_type": "default", "factor": "x"}), "field 'rope_scaling'"),
    "rope-factor-list": (_cfg(rope_scaling={"rope_type": "default", "factor": [1]}), "field 'rope_scaling'"),
    "header-is-list": (_header(lambda h: [h]), "a JSON list, expected an object"),
    "no-data-offsets": (_entry(EMB, data_offsets=None), f"tensor {EMB!r} must be an object with"),
    "negative-offsets": (_entry(EMB, data_offsets=[-8, 0]), "0 <= begin <= end"),
    "overlapping-offsets": (_header(lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"],
                                     "data_offsets": [0, h["model.norm.weight"]["data_offsets"][1] -
                                                      h["model.norm.weight"]["data_offsets"][0]]}}), "overlap"),
    "weight-map-not-str": (lambda ck: _sharded(ck, lambda wm: wm.update({EMB: 5})), f"weight_map[{EMB!r}] is 5"),
    "index-not-json": (lambda ck: _sharded(ck, index_text="{not json"), "model.safetensors.index.json: not valid"),
    "index-is-list": (lambda ck: _sharded(ck, index_text="[]"), "has no 'weight_map' object"),
}


@pytest.mark.parametrize("command", ["inspect", "validate", "logits", "generate", "convert"])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_inputs_are_one_line_errors(ck, tmp_path, capsys, case, command):
    edit, msg = CORRUPT[case]
    edit(ck)
    out = tmp_path / "out"
    args = {"inspect": ("inspect", ck), "validate": ("validate", ck),
            "logits": ("logits", ck, "--ids", tmp_path / "a.json", "--ids", tmp_path / "b.json", "--out", out),
            "generate": ("generate", ck, "--prompt-ids", "1,2,3", "--max-tokens", 2),
            "convert": ("convert", ck, out, "--to", "bf16")}[command]
    rc, text = run_cli(capsys, *args)
    if command == "inspect" and case.startswith(("header", "no-data", "negative", "overlap")):
        assert rc == 0 and "validation: 1 error(s)" in text  # inspect summarises the checkpoint's findings
    else:
        assert rc == (1 if command == "validate" else 2), text  # validate: exit 1 with its findings
    assert msg in text, text
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_inspect_reports_corrupt_headers_without_traceback(ck, capsys):
    _entry(EMB, data_offsets=[-8, 0])(ck)
    capsys.readouterr()
    assert cli("inspect", ck) == 0
    out = capsys.readouterr().out
    assert "validation: 1 error(s)" in out and "0 <= begin <= end" in out


@pytest.mark.parametrize("args,msg", [
    (("generate", "{ck}", "--prompt-ids", "1,2", "--tokens-per-block", "0"), "--tokens-per-block: must be a positive"),
    (("generate", "{ck}", "--prompt-ids", "1,2", "--temperature", "nan"), "--temperature: must be a finite number"),
    (("generate", "{ck}", "--prompt-ids", "1,2", "--chunk", "-1"), "--chunk: must be a positive integer"),
    (("logits", "{ck}", "--ids", "a.json", "--out", "x.npy", "--tokens-per-block", "0"), "must be a positive"),
    (("convert", "{ck}", "{tmp}/o", "--to", "bf16", "--max-shard-gb", "nan"), "--max-shard-gb: must be a finite"),
    (("convert", "{ck}", "{tmp}/o", "--to", "bf16", "--max-shard-gb", "0"), "--max-shard-gb: must be a finite number >"),
    (("convert", "{ck}", "{tmp}/o", "--to", "bf16", "--max-shard-gb", "-1"), "--max-shard-gb: must be a finite number >"),
    (("inspect", "{ck}", "--max-seq-len", "-5"), "--max-seq-len: must be a positive integer, got '-5'"),
    (("triton-repo", "--flavour", "reference", "--model", "{ck}", "--out", "{tmp}/r", "--max-batch-size", "0"),
     "--max-batch-size: must be a positive integer"),
    (("triton-repo", "--flavour", "reference", "--model", "{ck}", "--out", "{tmp}/r", "--max-batch-size", "-1"),
     "--max-batch-size: must be a positive integer"),
    (("triton-repo", "--flavour", "reference", "--model", "{ck}", "--out", "{tmp}/r", "--kv-cache-fraction", "inf"),
     "--kv-cache-fraction: must be a finite number"),
    (("synth", "{tmp}/s", "--seed", "x"), "--seed: must be an integer, got 'x'"),
])
def test_numeric_options_are_range_checked_by_the_parser(ck, tmp_path, capsys, args, msg):
    argv = [a.format(ck=ck, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_convert_shard_size_checked_by_the_converter_too(ck, tmp_path):
    from trtllm_loop.quantize.convert import convert

    with pytest.raises(UserError, match="--max-shard-gb must be positive"):
        convert(ck, tmp_path / "o", "bf16", max_shard_bytes=0)


def test_tracebacks_only_with_debug(ck, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--debug" in capsys.readouterr().out and "TRTLLM_LOOP_DEBUG" in open(REPO / "trtllm_loop/cli.py").read()
    _bad_utf8_config(ck)
    assert cli("inspect", ck) == 2
    with pytest.raises(UserError, match="not valid UTF-8"):
        cli("--debug", "inspect", ck)
    monkeypatch.setenv("TRTLLM_LOOP_DEBUG", "1")
    with pytest.raises(UserError):
        cli("inspect", ck)
    monkeypatch.delenv("TRTLLM_LOOP_DEBUG")
    # a bug (not a user error) is still one line, marked as internal, exit 1
    import trtllm_loop.commands.inspect as insp

    monkeypatch.setattr(insp, "report", lambda *a, **k: {}["boom"])
    capsys.readouterr()
    assert cli("inspect", ck) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error KeyError" in err and "--debug" in err


def test_help_documents_debug_and_force(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "TRTLLM_LOOP_DEBUG=1" in out and "--force" in out and "interrupted run" in out


# ------------------------------------------------------------------------------------------ 3. readers refuse
@pytest.mark.parametrize("field,value", [("rope_theta", float("nan")), ("rms_norm_eps", float("inf")),
                                         ("initializer_range", float("-inf")), ("attention_dropout", float("nan"))])
def test_non_finite_config_floats_are_refused(ck, capsys, field, value):
    _cfg(**{field: value})(ck)
    assert "NaN" in (ck / "config.json").read_text() or "Infinity" in (ck / "config.json").read_text()
    rc, text = run_cli(capsys, "validate", ck)
    assert rc == 1 and f"field {field!r} is {value!r}; it must be a finite number" in text


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_non_float_dense_weights_are_refused_by_the_loaders(ck, tmp_path, capsys, dtype):
    sd = load_file(str(ck / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = sd[name].to(dtype)
    save_file(sd, str(ck / "model.safetensors"))
    for args in (("logits", ck, "--ids", tmp_path / "a.json", "--out", tmp_path / "x.npy"),
                 ("generate", ck, "--prompt-ids", "1,2", "--max-tokens", 2)):
        rc, err = run_cli(capsys, *args)
        assert rc == 2 and f"tensor {name!r} has dtype" in err and "re-export" in err
    assert not (tmp_path / "x.npy").exists()


def test_nan_dense_weights_are_refused_and_validate_scans(ck, tmp_path, capsys):
    sd = load_file(str(ck / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    sd[name][3, 5] = float("nan")
    sd["model.norm.weight"][0] = float("inf")
    save_file(sd, str(ck / "model.safetensors"))
    rc, err = run_cli(capsys, "logits", ck, "--ids", tmp_path / "a.json", "--out", tmp_path / "x.npy")
    assert rc == 2 and "NaN/Inf" in err
    rc, out = run_cli(capsys, "validate", ck)
    assert rc == 1 and f"tensor {name!r}: has 1 NaN/Inf value(s)" in out
    assert "tensor 'model.norm.weight': has 1 NaN/Inf value(s)" in out


def test_the_same_tensor_in_two_shards_is_refused(ck, tmp_path, capsys):
    _sharded(ck)
    idx = json.loads((ck / "model.safetensors.index.json").read_text())
    shard2 = ck / "model-00002-of-00002.safetensors"
    s2 = load_file(str(shard2))
    s1 = load_file(str(ck / "model-00001-of-00002.safetensors"))
    dup = next(iter(s1))
    save_file({**s2, dup: s1[dup] + 1}, str(shard2))  # a second, different copy
    rc, err = run_cli(capsys, "logits", ck, "--ids", tmp_path / "a.json", "--out", tmp_path / "x.npy")
    assert rc == 2 and f"tensor {dup!r} is also stored in" in err
    # an extra shard the index does not list, holding a stale copy: validate finds it
    save_file({**s2}, str(shard2))
    save_file({dup: s1[dup]}, str(ck / "stale.safetensors"))
    assert idx["weight_map"][dup] == "model-00001-of-00002.safetensors"
    rc, out = run_cli(capsys, "validate", ck)
    assert rc == 1 and f"tensor {dup!r}: is stored in 2 files" in out


@pytest.mark.parametrize("where", ["absolute", "parent", "subdir"])
def test_shard_paths_outside_the_checkpoint_are_refused(ck, tmp_path, capsys, where):
    outside = tmp_path / "outside.safetensors"

    def edit(wm):
        shard = wm[EMB]
        shutil.move(ck / shard, outside)
        target = {"absolute": str(outside), "parent": "../outside.safetensors", "subdir": "sub/x.safetensors"}[where]
        for n, s in list(wm.items()):
            if s == shard:
                wm[n] = target
    _sharded(ck, edit)
    rc, err = run_cli(capsys, "logits", ck, "--ids", tmp_path / "a.json", "--out", tmp_path / "x.npy")
    assert rc == 2 and "a path outside the checkpoint directory" in err
    # build --weights copy therefore never writes a deploy directory whose index points outside it
    from trtllm_loop.trtllm.deploy import build

    with pytest.raises(UserError, match="outside the checkpoint directory"):
        build(ck, REPO / "build_configs/b200.yaml", tmp_path / "deploy", weights="copy")
    assert not (tmp_path / "deploy").exists()


def test_absurd_sizes_fail_fast(ck, tmp_path, capsys):
    assert cli("inspect", ck) == 0  # warm the imports
    for field, v in (("num_hidden_layers", 10**6), ("hidden_size", 10**7), ("vocab_size", 10**9),
                     ("intermediate_size", 10**8)):
        shutil.copy2(golden(CASE)[0] / "config.json", ck / "config.json")
        _cfg(**{field: v})(ck)
        for args in (("inspect", ck), ("validate", ck), ("convert", ck, tmp_path / "o", "--to", "bf16")):
            t = time.perf_counter()
            rc, text = run_cli(capsys, *args)
            dt = time.perf_counter() - t
            assert rc in (1, 2) and f"field {field!r} is {v}, above the supported maximum" in text, text
            # refused before anything is sized or allocated: far below what building a 10^9-row table takes
            # (a loose bound on a shared, loaded machine; the check is the message, the bound only catches a hang)
            assert dt < 10, (args, dt)


# ------------------------------------------------------------------------------------------ 4. interrupted writes
HOLD = """
import sys, time
from trtllm_loop.fsutil import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "model-00001.safetensors").write_bytes(b"partial" * 1000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_kill_9_leaves_a_temp_dir_the_next_run_removes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "conv"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    try:
        tmp = Path(p.stdout.readline().strip())
        assert tmp.is_dir() and tmp.parent == tmp_path and not out.exists()
        # while the writer lives, its temp dir is locked: a run starting now leaves it alone
        import trtllm_loop.fsutil as fsutil

        monkeypatch.setattr(fsutil, "_PROCESS_START", time.time() + 1)
        assert cli("synth", tmp_path / "other", "--no-tokenizer") == 0
        assert tmp.is_dir() and "removed" not in capsys.readouterr().err
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert tmp.is_dir() and not out.exists()  # kill -9: no partial output under the final name
    foreign = tmp_path / ".conv.tmp-someone-else"  # not ours: kept
    foreign.mkdir()
    # a run that started before the temp dir was made leaves it (it may belong to a concurrent run)
    monkeypatch.setattr(fsutil, "_PROCESS_START", tmp.stat().st_mtime - 10)
    assert cli("synth", tmp_path / "other2", "--no-tokenizer") == 0
    assert tmp.is_dir()
    # the next run (started after it) removes it and says so
    monkeypatch.setattr(fsutil, "_PROCESS_START", time.time() + 1)
    capsys.readouterr()
    assert cli("synth", tmp_path / "other3", "--no-tokenizer") == 0
    err = capsys.readouterr().err
    assert not tmp.exists() and f"removed {tmp}, a temporary directory left by an interrupted run" in err
    assert foreign.is_dir()


def test_next_process_cleans_up_a_killed_convert(tmp_path):
    """The real thing, end to end: `convert` killed with SIGKILL mid-write, then a fresh `synth` next to it."""
    src = tmp_path / "src"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exe = [sys.executable, "-m", "trtllm_loop.cli"]
    assert subprocess.run(exe + ["synth", src, "--preset", "small", "--no-tokenizer"], env=env,
                          capture_output=True).returncode == 0
    slow = textwrap.dedent("""
        import sys, time
        import trtllm_loop.checkpoint.writer as w
        from trtllm_loop.cli import main
        orig = w.SafetensorsWriter.write
        def write(self, name, t):
            orig(self, name, t); self._f.flush(); print("writing", flush=True); time.sleep(600)
        w.SafetensorsWriter.write = write
        main(sys.argv[1:])
    """)
    p = subprocess.Popen([sys.executable, "-c", slow, "convert", str(src), str(tmp_path / "fp8"), "--to", "bf16"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    stale = [q for q in tmp_path.iterdir() if q.name.startswith(".fp8.trtllm-loop-tmp-")]
    assert len(stale) == 1 and any(stale[0].glob("*.safetensors")) and not (tmp_path / "fp8").exists()
    r = subprocess.run(exe + ["synth", tmp_path / "next", "--no-tokenizer"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and f"removed {stale[0]}" in r.stderr and not stale[0].exists()


def test_atomic_dir_rechecks_before_replacing(tmp_path):
    """A directory someone else created while we were writing is not replaced either."""
    out = tmp_path / "o"
    with pytest.raises(UserError, match="already exists"):
        with atomic_dir(out) as tmp:
            (tmp / "f").write_text("x")
            out.mkdir()
            (out / "theirs").write_text("y")
    assert (out / "theirs").read_text() == "y" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------ 5. the new commands
def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connect is refused
    return port


def test_bench_unreachable_endpoint_is_one_error_before_any_request(tmp_path, capsys):
    port = _closed_port()
    out = tmp_path / "b"
    rc, err = run_cli(capsys, "bench", "--endpoint", "openai", f"http://127.0.0.1:{port}", "--model", "m",
                      "--out", out)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"error: --endpoint openai http://127.0.0.1:{port}: cannot connect to 127.0.0.1:{port} " \
           "(ConnectionRefusedError" in err and "start the server" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kind,url,msg", [
    ("triton-grpc", "127.0.0.1", "Triton gRPC needs host:port"),
    ("openai", "http://127.0.0.1:notaport", "the port is not a number"),
    ("triton-http", "http://:8000", "no host"),
    ("nope", "127.0.0.1:1", "endpoint 'nope' unknown; allowed: openai, triton-grpc, triton-http"),
])
def test_bench_malformed_urls_name_the_flag(tmp_path, capsys, kind, url, msg):
    rc, err = run_cli(capsys, "bench", "--endpoint", kind, url, "--model", "m", "--out", tmp_path / "b")
    assert rc == 2 and f"error: --endpoint {kind} {url}: " in err and msg in err, err


def test_bench_prompts_file_without_prompt_field(tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    rc, err = run_cli(capsys, "bench", "--endpoint", "openai", "http://127.0.0.1:1", "--model", "m",
                      "--prompts", p, "--out", tmp_path / "b")
    assert rc == 2 and f"error: --prompts {p}: {p}:2: expected an object with a 'prompt' string" in err, err


def test_bench_stops_after_a_level_where_every_request_failed():
    from trtllm_loop.serving import bench

    t = bench.Target("openai", f"http://127.0.0.1:{_closed_port()}", "m", timeout=5)
    res = bench.run_bench(t, ["x"], bench.BenchConfig([1, 4, 16], num_requests=2, output_len=2))
    assert [lv["concurrency"] for lv in res["levels"]] == [1]
    assert res["levels"][0]["errors"] == 2 and "ConnectionRefusedError" in res["levels"][0]["error_messages"][0]


@pytest.mark.parametrize("spec", ["ngram:", "ngram:0", "ngram:x", "draft:", "draft:somewhere:", "draft:x:0",
                                  "draft:x:17", "eagle"])
def test_malformed_speculative_specs_fail_before_the_model_loads(tmp_path, capsys, spec):
    """The spec is checked first: the (missing) checkpoint is never read."""
    rc, err = run_cli(capsys, "generate", tmp_path / "missing", "--prompt-ids", "1,2", "--speculative", spec)
    assert rc == 2 and err.startswith(f"error: --speculative: speculative spec {spec!r}: ") and \
        err.count("\n") == 1, err


def test_speculative_draft_errors_name_the_draft(ck, tmp_path, capsys):
    rc, err = run_cli(capsys, "generate", ck, "--prompt-ids", "1,2", "--speculative", f"draft:{tmp_path}/none")
    assert rc == 2 and f"error: --speculative: {tmp_path}/none: not found" in err
    other = tmp_path / "other"
    assert cli("synth", other, "--preset", "tiny", "--no-tokenizer", "--dtype", "float32") == 0
    v_other = json.loads((other / "config.json").read_text())["vocab_size"]
    v_ck = json.loads((ck / "config.json").read_text())["vocab_size"]
    assert v_other != v_ck
    rc, err = run_cli(capsys, "generate", ck, "--prompt-ids", "1,2", "--speculative", f"draft:{other}:2")
    assert rc == 2 and f"vocab_size {v_other} differs from the target's {v_ck}" in err


@pytest.mark.parametrize("extra,msg", [
    (("--calib", "{tmp}"), "error: {tmp}: --calib cannot be read (Is a directory)"),
    (("--seq-len", "1"), "error: --seq-len 1: a calibration sample needs at least 2 tokens"),
    (("--calib", "builtin"), "needs the checkpoint's tokenizer, which does not load"),  # ck has no tokenizer
])
def test_quantize_calibration_mistakes_are_one_line(ck, tmp_path, capsys, extra, msg):
    out = tmp_path / "q"
    rc, err = run_cli(capsys, "quantize", ck, out, "--qformat", "fp8", "--num-samples", "2",
                      *[a.format(tmp=tmp_path) for a in extra])
    assert rc == 2 and msg.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert not out.exists()


def test_gate_plugin_that_is_not_a_library(tmp_path):
    from trtllm_loop.trtllm.engine.plugin_lib import check_plugin_sm

    lib = tmp_path / "libloop_gate.so"
    lib.write_text("{}")
    with pytest.raises(UserError, match=r"--gate-plugin .*: not a shared library \(no ELF header\)"):
        check_plugin_sm(lib, 100, "b200.yaml")


def test_trtllm_checkpoint_mistakes_are_one_line(ck, tmp_path, capsys):
    """A TRT-LLM checkpoint where an HF one is needed, and a truncated rank file, name the file and the fix."""
    tc = tmp_path / "tc"
    assert cli("convert", ck, tc, "--to", "trtllm-ckpt") == 0
    for args in (("convert", tc, tmp_path / "o", "--to", "trtllm-ckpt"),
                 ("quantize", tc, tmp_path / "o", "--qformat", "fp8", "--num-samples", "1")):
        rc, err = run_cli(capsys, *args)
        assert rc == 2 and err.count("\n") == 1 and f"{tc}/config.json: a TensorRT-LLM checkpoint" in err and \
            "give the HF checkpoint it was converted from" in err, err
    max_pos = json.loads((ck / "config.json").read_text())["max_position_embeddings"]
    bc = tmp_path / "b200.yaml"
    bc.write_text((REPO / "build_configs/b200.yaml").read_text().replace("max_seq_len: 32768",
                                                                        f"max_seq_len: {max_pos}"))
    rank0 = tc / "rank0.safetensors"
    rank0.write_bytes(rank0.read_bytes()[:100])
    for args in (("logits", tc, "--ids", tmp_path / "a.json", "--mode", "engine", "--out", tmp_path / "o.npy"),
                 ("build", tc, "--backend", "tensorrt", "--config", bc, "--out", tmp_path / "o")):
        rc, err = run_cli(capsys, *args)
        assert rc == 2 and f"error: {rank0}: cannot read the safetensors header" in err, (args, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.npy").exists()


def test_a_failed_validation_is_one_line(ck, tmp_path, capsys):
    sd = raw_header(ck / "model.safetensors")
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:len(sd[1]) // 2])
    rc, err = run_cli(capsys, "convert", ck, tmp_path / "o", "--to", "trtllm-ckpt")
    assert rc == 2 and err.count("\n") == 1 and f"error: {ck}: checkpoint failed validation: " in err, err


@pytest.mark.parametrize("work,out,msg", [
    ("q", "q", "overlaps the output"),
    ("w", "w/q", "overlaps the output"),       # was: OUT written, then deleted with the spill
    ("q/w", "q", "overlaps the output"),
    ("ck/w", "q", "is inside the source checkpoint"),
    ("a.json", "q", "exists and is not a directory"),
])
def test_quantize_work_dir_never_overlaps_output_or_source(ck, tmp_path, capsys, work, out, msg):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"input_ids": [1, 2, 3, 4]}\n' * 2)
    before = tree(ck)
    rc, err = run_cli(capsys, "quantize", ck, tmp_path / out, "--qformat", "fp8", "--mode", "streamed",
                      "--calib", calib, "--num-samples", "2", "--work-dir", tmp_path / work)
    assert rc == 2 and f"error: --work-dir {tmp_path / work}: {msg}" in err, err
    assert not (tmp_path / out).exists() and tree(ck) == before
    assert (tmp_path / work).is_file() or not (tmp_path / work).exists()


def test_quantize_empties_but_keeps_a_work_dir_the_user_made(ck, tmp_path, capsys):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"input_ids": [1, 2, 3, 4]}\n' * 2)
    (tmp_path / "spill").mkdir()
    rc, err = run_cli(capsys, "quantize", ck, tmp_path / "q", "--qformat", "fp8", "--mode", "streamed",
                      "--calib", calib, "--num-samples", "2", "--work-dir", tmp_path / "spill")
    assert rc == 0, err
    assert (tmp_path / "q" / "hf_quant_config.json").is_file()
    assert (tmp_path / "spill").is_dir() and list((tmp_path / "spill").iterdir()) == []


def test_an_output_inside_the_input_checkpoint_is_refused(ck, tmp_path, capsys):
    """A checkpoint nested in its source: a later `--force` on the source would delete it with it."""
    before = tree(ck)
    for args in (("convert", ck, ck / "o", "--to", "bf16"), ("convert", ck, ck / "o", "--to", "trtllm-ckpt"),
                 ("quantize", ck, ck / "o", "--qformat", "fp8"),
                 ("logits", ck, "--ids", tmp_path / "a.json", "--ids", tmp_path / "b.json", "--out", ck / "o")):
        rc, err = run_cli(capsys, *args)
        assert rc == 2 and f"refusing to write here, it is inside the input {ck.resolve()}" in err, (args, err)
    assert tree(ck) == before
    assert cli("logits", ck, "--ids", tmp_path / "a.json", "--out", ck / "o.npy") == 0  # a single file may


def test_logits_engine_tp_must_match_a_converted_checkpoint(ck, tmp_path, capsys):
    tc = tmp_path / "tc"
    assert cli("convert", ck, tc, "--to", "trtllm-ckpt") == 0
    rc, err = run_cli(capsys, "logits", tc, "--ids", tmp_path / "a.json", "--mode", "engine", "--tp", "2",
                      "--out", tmp_path / "o.npy")
    assert rc == 2 and f"error: --tp 2: {tc} already holds 1 rank(s); drop --tp" in err, err
    assert not (tmp_path / "o.npy").exists()
