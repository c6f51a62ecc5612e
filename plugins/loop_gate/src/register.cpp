// Static registration for processes that load plugins by LD_PRELOAD (tritonserver, the TRT-LLM runtime: no
// hook for plugin libraries there). REGISTER_TENSORRT_PLUGIN (NvInferRuntime.h) registers a creator with
// getPluginRegistry() while the library loads, so this translation unit lives in its own library,
// libiquest_loop_gate_preload.so, linked against libnvinfer: the getCreators library stays free of it.
#include "plugin.h"

using loop_gate::GateMixPluginCreator;  // the macro pastes its argument into a variable name

REGISTER_TENSORRT_PLUGIN(GateMixPluginCreator);
