"""Mimics ``tensorrt_llm/module.py`` (``Module``, ``ModuleList``; not in ../shared/reference): attributes that
are modules or ``Parameter``s are registered by name, ``named_parameters()`` yields dotted names (the
checkpoint's tensor names), calling a module calls ``forward``."""
from collections import OrderedDict

from tensorrt_llm.parameter import Parameter


class Module:

    def __init__(self):
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_parameters", OrderedDict())

    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self._modules[name] = value
        elif isinstance(value, Parameter) or (value is None and name in self.__dict__.get("_parameters", {})):
            self._parameters[name] = value
        object.__setattr__(self, name, value)

    def register_parameter(self, name, param):
        self._parameters[name] = param
        object.__setattr__(self, name, param)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix=""):
        for mod_name, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if p is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]


class ModuleList(Module):

    def __init__(self, modules) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            self._modules[str(i)] = m

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)
