"""Mimics ``tensorrt_llm/parameter.py`` ``Parameter`` (not in ../shared/reference): a named weight of the
network. ``value`` (getter) is the network tensor of the weight -- the same tensor however many times the
model reads it, so a Parameter read by both loop passes is one weight in the engine; ``value`` (setter) loads
it, refusing a shape or dtype other than declared (``PretrainedModel.load`` reports the name)."""
import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
           None: None}


class Parameter:

    def __init__(self, value=None, shape=None, dtype=None, is_buffer: bool = False, prefer_managed: bool = False):
        if isinstance(dtype, str) or dtype is None:
            dtype = _DTYPES[dtype]
        self._dtype, self.is_buffer = dtype, is_buffer
        self._shape = tuple(shape) if shape is not None else None
        self._value = None
        self._tensor = None
        if value is not None:
            self.value = value

    @property
    def shape(self):
        return self._shape if self._value is None else tuple(self._value.shape)

    @property
    def dtype(self):
        return self._dtype

    def is_inited(self) -> bool:
        return self._value is not None

    @property
    def value(self):
        from tensorrt_llm.functional import constant

        if self._value is None:
            raise RuntimeError("a Parameter was read before it was loaded (PretrainedModel.load sets every weight)")
        if self._tensor is None:
            self._tensor = constant(self._value)
        return self._tensor

    @value.setter
    def value(self, v):
        t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        if self._shape is not None and tuple(t.shape) != self._shape:
            raise ValueError(f"shape {tuple(t.shape)} != the declared {self._shape}")
        if self._dtype is not None and t.dtype != self._dtype:
            raise ValueError(f"dtype {t.dtype} != the declared {self._dtype}")
        self._value, self._tensor = t.contiguous(), None

    @property
    def raw_value(self):
        return self._value
