"""Issue 9 item 6: the llmapi Triton model meets MPI as TensorRT-LLM's llmapi model does
(../shared/reference/TensorRT-LLM/triton_backend/all_models/llmapi/tensorrt_llm/1/model.py @b35ac1b, initialize:
world size > 1 -> ``MpiCommSession(comm=COMM_WORLD, n_workers=COMM_WORLD.Get_size())`` passed as ``_mpi_session``,
ranks > 0 wait in ``MPICommExecutor(COMM_WORLD)``), and clears ``OMPI_*`` / ``PMIX_*`` variables inherited from
another MPI job before ``tensorrt_llm`` is imported. Run in process with stand-ins for
``triton_python_backend_utils``, ``mpi4py`` and TRT-LLM's ``MpiCommSession`` (no MPI on CPU CI)."""
from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from trtllm_loop.serving.render import MODELS_SRC


def _pb_utils():
    m = types.ModuleType("triton_python_backend_utils")
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    m.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(error=error)
    m.TritonError = lambda msg: types.SimpleNamespace(message=lambda: msg)
    m.Tensor = lambda name, arr: (name, arr)
    m.logged = []
    m.Logger = types.SimpleNamespace(log_info=m.logged.append, log_error=m.logged.append)
    return m


class _LLM:
    instances: list = []
    env_at_init: dict = {}

    def __init__(self, **kwargs):
        import os

        self.kwargs = kwargs
        _LLM.instances.append(self)
        _LLM.env_at_init = {k: v for k, v in os.environ.items() if k.startswith(("OMPI_", "PMIX_"))}

    def shutdown(self):
        pass


class _Comm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size


@pytest.fixture
def load(tmp_path, monkeypatch):
    """``load(yaml_text, rank=0)``: the model initialized as the Python backend would, its pb_utils, its mpi4py."""
    def _load(model_yaml: str, rank: int = 0, size: int = 1):
        pb = _pb_utils()
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
        trt = types.ModuleType("tensorrt_llm")
        trt.LLM, trt.SamplingParams = _LLM, dict
        llmapi = types.ModuleType("tensorrt_llm.llmapi")
        llmapi.KvCacheConfig = dict
        llmapi.sessions = []
        llmapi.MpiCommSession = lambda comm, n_workers: llmapi.sessions.append((comm, n_workers)) or ("session",
                                                                                                       n_workers)
        mpi = types.ModuleType("mpi4py")
        mpi.MPI = types.ModuleType("mpi4py.MPI")
        mpi.MPI.COMM_WORLD = _Comm(rank, size)
        mpi.futures = types.ModuleType("mpi4py.futures")
        mpi.executors = []

        class _Executor:
            def __init__(self, comm):
                mpi.executors.append(comm)

            def __enter__(self):
                return None  # a worker rank: no executor (mpi4py returns it on the root only)

            def __exit__(self, *a):
                return False

        mpi.futures.MPICommExecutor = _Executor
        for name, m in (("tensorrt_llm", trt), ("tensorrt_llm.llmapi", llmapi), ("mpi4py", mpi),
                        ("mpi4py.MPI", mpi.MPI), ("mpi4py.futures", mpi.futures)):
            monkeypatch.setitem(sys.modules, name, m)
        d = tmp_path / f"r{rank}" / "1"
        d.mkdir(parents=True)
        (d / "model.py").write_text((MODELS_SRC / "llmapi.py").read_text())
        (d / "model.yaml").write_text(model_yaml)
        spec = importlib.util.spec_from_file_location(f"llmapi_mpi_{rank}", d / "model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        model = mod.TritonPythonModel()
        _LLM.instances.clear()
        model.initialize({"model_config": json.dumps({"parameters": {}})})
        return model, pb, llmapi, mpi
    return _load


TP1 = "model: /m\nbackend: pytorch\ntriton_config:\n  decoupled: true\n"
TP2 = "model: /m\nbackend: pytorch\ntensor_parallel_size: 2\ntriton_config:\n  decoupled: true\n"
INHERITED = {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0", "OMPI_MCA_orte_hnp_uri": "123.0;tcp://x",
             "PMIX_SERVER_URI41": "pmix-server.4242;tcp4://127.0.0.1:1", "PMIX_NAMESPACE": "prterun-x-4242@1"}


def test_inherited_mpi_variables_are_cleared_before_tensorrt_llm(load, monkeypatch):
    for k, v in INHERITED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMPLACES", "cores")  # not an MPI variable: kept
    model, pb, llmapi, mpi = load(TP1)
    assert _LLM.env_at_init == {}  # LLM(...) saw none of them
    import os
    assert not [k for k in os.environ if k.startswith(("OMPI_", "PMIX_"))] and os.environ["OMPLACES"] == "cores"
    assert "_mpi_session" not in _LLM.instances[-1].kwargs and llmapi.sessions == [] and mpi.executors == []
    assert any("cleared 5 inherited MPI variables" in m for m in pb.logged), pb.logged


def test_tp2_without_mpirun_clears_and_lets_the_llm_spawn_its_workers(load, monkeypatch):
    """Not launched by mpirun (no OMPI_COMM_WORLD_SIZE of 2): TRT-LLM's LLM starts its own MpiPoolSession
    (llm.py, LLM.__init__), so inherited variables go and no session is passed."""
    monkeypatch.setenv("PMIX_NAMESPACE", "stale")
    model, pb, llmapi, mpi = load(TP2)
    assert "_mpi_session" not in _LLM.instances[-1].kwargs and _LLM.env_at_init == {}
    assert _LLM.instances[-1].kwargs["tensor_parallel_size"] == 2


def test_tp2_under_mpirun_rank0_passes_an_mpi_comm_session(load, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    model, pb, llmapi, mpi = load(TP2, rank=0, size=2)
    kwargs = _LLM.instances[-1].kwargs
    assert kwargs["_mpi_session"] == ("session", 2)
    (comm, n), = llmapi.sessions
    assert comm is sys.modules["mpi4py.MPI"].COMM_WORLD and n == 2
    assert _LLM.env_at_init == {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}  # the world's own: kept


def test_tp2_under_mpirun_rank1_is_a_worker_and_refuses_requests(load, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    model, pb, llmapi, mpi = load(TP2, rank=1, size=2)
    assert _LLM.instances == [] and len(mpi.executors) == 1 and llmapi.sessions == []
    sent = []
    req = types.SimpleNamespace(get_response_sender=lambda: types.SimpleNamespace(
        send=lambda r=None, flags=0: sent.append((r, flags))), request_id=lambda: "")
    model.execute([req])
    (resp, flags), = sent
    assert flags == 1 and "MPI worker of rank 0" in resp.error.message()
    model.finalize()  # no LLM: nothing to shut down


def test_a_world_that_differs_from_model_yaml_is_refused(load, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match=r"model.yaml: tensor_parallel_size x pipeline_parallel_size = 2, but this "
                                         r"Triton is one of 4 MPI ranks.*--world_size 2"):
        load(TP2, rank=0, size=4)


def test_the_double_accepts_mpi_session_as_llm_does():
    """llm.py @4c05a74: valid_keys = TorchLlmArgs fields + ['_mpi_session', 'backend']; anything else refused."""
    from trtllm_loop.trtllm.double.tensorrt_llm.llmapi.llm import LLM_ARG_FIELDS

    assert "_mpi_session" in LLM_ARG_FIELDS
    real = (__import__("pathlib").Path(__file__).resolve().parents[2] / "shared/reference/TensorRT-LLM/"
            "tensorrt_llm/llmapi/llm.py")
    if real.is_file():
        assert "['_mpi_session', 'backend']" in real.read_text()


def test_an_installed_but_broken_tensorrt_llm_is_not_replaced_by_the_double(tmp_path, monkeypatch):
    """compat.ensure_tensorrt_llm: the double only where TRT-LLM is absent, never over a broken install."""
    from trtllm_loop.trtllm import compat

    pkg = tmp_path / "tensorrt_llm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt_llm", raising=False)
    with pytest.raises(ImportError, match="libcuda.so.1"):
        compat.ensure_tensorrt_llm()
