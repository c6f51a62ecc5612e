"""Mimics ``tensorrt_llm/_common.py`` (``default_net``, ``default_trtnet``) and ``tensorrt_llm/network.py``
(``Network``, ``net_guard``) -- neither is in ../shared/reference; double-only in what they hold.

The double's network is **eager**: every functional op computes its torch result when it is added, and
``trt_network.add_plugin_v3`` runs the plugin at once. What a real build would serialize is recorded instead:
the plugin layers (creator name, version, namespace, fields) and the marked outputs, so that ``builder.build``
can write an engine file the double runtime checks against."""
import contextlib
import threading

import tensorrt as trt


class _Layer:
    def __init__(self, outputs, name: str = ""):
        self._outputs, self.name = outputs, name

    def get_output(self, index: int):
        return self._outputs[index]

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)


class ITensor:
    """``trt.ITensor`` in an eager network: holds its torch value."""

    def __init__(self, value, name: str = ""):
        self.value, self.name = value, name

    @property
    def shape(self):
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype


class _TrtNetwork:
    """``trt.INetworkDefinition``: only ``add_plugin_v3`` (NvInfer.h ``addPluginV3``)."""

    def __init__(self, owner: "Network"):
        self.owner = owner

    def add_plugin_v3(self, inputs, shape_inputs, plugin):
        if shape_inputs:
            raise NotImplementedError("the double's plugins take no shape inputs")
        for t in inputs:
            if not isinstance(t, ITensor):
                raise TypeError(f"add_plugin_v3 takes trt.ITensor inputs (functional.Tensor.trt_tensor), got "
                                f"{type(t).__name__}")
        outs = plugin.enqueue_eager([t.value for t in inputs])
        layer = _Layer([ITensor(o) for o in outs], name=f"{plugin.plugin_name}_{len(self.owner.plugin_layers)}")
        self.owner.plugin_layers.append({"plugin": plugin.plugin_name, "version": plugin.plugin_version,
                                         "namespace": plugin.plugin_namespace, "fields": plugin.fields})
        return layer


class Network:
    def __init__(self, plugin_config=None):
        self.plugin_config = plugin_config
        self.trt_network = _TrtNetwork(self)
        self.plugin_layers: list = []
        self.outputs: dict = {}
        self.dtype = None
        self.strongly_typed = True

    def _set_layer_name(self, layer) -> None:
        pass


_LOCAL = threading.local()  # one network stack per thread: simulated TP ranks build concurrently


def _stack() -> list:
    if not hasattr(_LOCAL, "networks"):
        _LOCAL.networks = []
    return _LOCAL.networks


def default_net() -> Network:
    assert _stack(), "no network: run the model under net_guard(network) (the builder and runtime do)"
    return _stack()[-1]


def default_trtnet() -> _TrtNetwork:
    return default_net().trt_network


@contextlib.contextmanager
def net_guard(network: Network):
    _stack().append(network)
    try:
        yield network
    finally:
        _stack().pop()


__all__ = ["default_net", "default_trtnet", "net_guard", "Network", "ITensor", "trt"]
