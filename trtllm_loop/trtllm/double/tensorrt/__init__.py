"""API double of the few TensorRT 10.x Python symbols the engine flow touches (not the real package).

Names follow the C++ API in ``../shared/reference/TensorRT/include`` (``NvInfer.h``: ``INetworkDefinition::
addPluginV3``; ``NvInferRuntime.h`` / ``NvInferRuntimePlugin.h``: ``IPluginRegistry::getCreator``,
``PluginField``, ``PluginFieldCollection``, ``PluginFieldType``, ``TensorRTPhase``), snake_cased as the Python
bindings spell them. Execution is eager: a "network" runs each layer when it is added (see
``tensorrt_llm._common``). A plugin creator registered here is a Python object whose plugins implement
``enqueue_eager(inputs) -> outputs`` on torch tensors -- the double's stand-in for a plugin library that a real
process loads with ``ctypes.CDLL`` / ``LD_PRELOAD`` (its ``REGISTER_TENSORRT_PLUGIN`` fills the registry)."""
import enum

IS_TRTLLM_LOOP_DOUBLE = True
__version__ = "10.14.1"


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT32 = "int32"
    INT64 = "int64"
    INT8 = "int8"
    FP8 = "float8_e4m3fn"
    BOOL = "bool"


class TensorLocation(enum.Enum):
    DEVICE = 0
    HOST = 1


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8


class TensorRTPhase(enum.Enum):
    BUILD = 0
    RUNTIME = 1


class PluginField:
    def __init__(self, name: str, data=None, type: PluginFieldType = PluginFieldType.UNKNOWN):
        self.name, self.data, self.type = name, data, type


class PluginFieldCollection(list):
    """A list of :class:`PluginField` (the bindings accept a Python list)."""


class _Registry:
    """``IPluginRegistry``: creators by (name, version, namespace)."""

    def __init__(self):
        self._creators = {}

    def register_creator(self, creator, plugin_namespace: str = "") -> bool:
        key = (creator.name, creator.plugin_version, plugin_namespace)
        if key in self._creators:
            return False  # the real registry refuses a second creator of the same name/version/namespace
        self._creators[key] = creator
        return True

    def deregister_creator(self, creator) -> bool:
        keys = [k for k, c in self._creators.items() if c is creator]
        for k in keys:
            del self._creators[k]
        return bool(keys)

    def get_creator(self, name: str, version: str, plugin_namespace: str = ""):
        return self._creators.get((name, version, plugin_namespace))

    get_plugin_creator = get_creator

    @property
    def all_creators(self):
        return list(self._creators.values())


_REGISTRY = _Registry()


def get_plugin_registry() -> _Registry:
    return _REGISTRY
