"""Mimics ``tensorrt_llm/_torch/models/checkpoints/hf/weight_mapper.py`` (reference commit
f59aed070dabff4761d70e47c90fd761776c1bac) ``HfWeightMapper``: what ``ModelLoader`` passes to a model whose
``load_weights`` has a ``weight_mapper`` parameter (``model_loader.py`` @b51992a, ``_call_load_weights``), which
selects ``_load_weights_impl_v2`` in ``modeling_utils.py``. The double does not emulate the v2 path: its
``DecoderModelForCausalLM.load_weights`` refuses a mapper, so a model that would take the v2 path on real
TRT-LLM fails in CI instead of loading differently on a GPU."""


class HfWeightMapper:

    def __init__(self):
        self._model = None
        self._config = None

    def init_model_and_config(self, model, config):
        self._model, self._config = model, config
