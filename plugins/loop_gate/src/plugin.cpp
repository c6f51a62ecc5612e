// IQuestLoopGateMix (plugin.h) and the plugin-library entry points of TensorRT 10: TensorRT's
// IPluginRegistry::loadLibrary (and trtexec --dynamicPlugins) look up two C symbols in the library,
//   extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder*);
//   extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
// (NVIDIA/TensorRT samples/trtexec/README.md, "plugin shared library must expose the below symbols").
#include "plugin.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <new>

#include "gate_kernel.h"

#define LOOP_GATE_EXPORT extern "C" __attribute__((visibility("default")))

namespace loop_gate {
namespace {

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

bool isFloat(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

// a static extent must equal `want`; -1 (dynamic at build time) is accepted
bool extentIs(int64_t got, int64_t want) { return got == -1 || got == want; }

std::vector<PluginField> fieldsOf(GateMixParams const* p) {
  return {PluginField("num_heads", p ? &p->num_heads : nullptr, PluginFieldType::kINT32, 1),
          PluginField("head_dim", p ? &p->head_dim : nullptr, PluginFieldType::kINT32, 1),
          PluginField("rope_theta", p ? &p->rope_theta : nullptr, PluginFieldType::kFLOAT32, 1)};
}

int32_t badArity(int32_t nbInputs, int32_t nbOutputs) {
  logError("expects 6 inputs (q, positions, global_out, local_out, gate_weight, gate_bias) and 1 output, got " +
           std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
  return -1;
}

}  // namespace

void logError(std::string const& message) noexcept {
  try {
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger) logger->log(nvinfer1::ILogger::Severity::kERROR, (std::string(kPluginName) + ": " + message).c_str());
  } catch (...) {
  }
}

// ---------------------------------------------------------------------------------------------------- plugin
GateMixPlugin::GateMixPlugin(GateMixParams params) : params_(params), fields_(fieldsOf(&params_)) {
  collection_.nbFields = static_cast<int32_t>(fields_.size());
  collection_.fields = fields_.data();
}

GateMixPlugin::GateMixPlugin(GateMixPlugin const& other) : GateMixPlugin(other.params_) {}

nvinfer1::IPluginCapability* GateMixPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* GateMixPlugin::clone() noexcept {
  try {
    return new GateMixPlugin(*this);
  } catch (...) {
    return nullptr;
  }
}

bool GateMixPlugin::checkDims(nvinfer1::Dims const* d) const {
  int64_t const H = params_.num_heads, D = params_.head_dim;
  bool ok = d[0].nbDims == 3 && extentIs(d[0].d[1], H) && extentIs(d[0].d[2], D);
  ok = ok && d[1].nbDims == 1 && extentIs(d[1].d[0], d[0].d[0]);
  for (int i : {2, 3})
    ok = ok && d[i].nbDims == 3 && extentIs(d[i].d[0], d[0].d[0]) && extentIs(d[i].d[1], H) && extentIs(d[i].d[2], D);
  ok = ok && d[4].nbDims == 2 && extentIs(d[4].d[0], H) && extentIs(d[4].d[1], D);
  ok = ok && d[5].nbDims == 1 && extentIs(d[5].d[0], H);
  if (!ok)
    logError("input shapes must be q, global_out, local_out [N, " + std::to_string(H) + ", " + std::to_string(D) +
             "], positions [N], gate_weight [" + std::to_string(H) + ", " + std::to_string(D) + "], gate_bias [" +
             std::to_string(H) + "] (fields num_heads, head_dim)");
  return ok;
}

int32_t GateMixPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                       nvinfer1::DynamicPluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  if (nbOutputs != 1 || nbInputs != kNbInputs) return badArity(nbInputs, nbOutputs);
  nvinfer1::Dims dims[kNbInputs];
  for (int i = 0; i < kNbInputs; ++i) dims[i] = in[i].desc.dims;
  return checkDims(dims) ? 0 : -1;
}

int32_t GateMixPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                          int32_t nbInputs) const noexcept {
  if (nbOutputs != 1 || nbInputs != kNbInputs) return badArity(nbInputs, nbOutputs);
  if (!isFloat(inputTypes[0])) {
    logError("q must be FLOAT, HALF or BF16");
    return -1;
  }
  outputTypes[0] = inputTypes[0];
  return 0;
}

int32_t GateMixPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                       nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/,
                                       nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                       nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept {
  if (nbOutputs != 1 || nbInputs != kNbInputs) return badArity(nbInputs, nbOutputs);
  if (inputs[0].nbDims != 3) {
    logError("q must be [N, num_heads, head_dim]");
    return -1;
  }
  auto const is = [](nvinfer1::IDimensionExpr const* e, int64_t v) {
    return !e->isConstant() || e->getConstantValue() == v;
  };
  if (!is(inputs[0].d[1], params_.num_heads) || !is(inputs[0].d[2], params_.head_dim)) {
    logError("q's last two extents differ from the fields num_heads, head_dim");
    return -1;
  }
  outputs[0] = inputs[0];  // [N, H, D], the very expressions of q
  return 0;
}

bool GateMixPlugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                              int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != 1 || pos < 0 || pos >= kNbInputs + 1) return false;
  nvinfer1::PluginTensorDesc const& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  if (pos == 1) return d.type == DataType::kINT32;  // positions
  if (pos == 0) return isFloat(d.type);
  return d.type == inOut[0].desc.type;  // every other tensor, the output included, in q's dtype
}

int32_t GateMixPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                                     nvinfer1::PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept {
  if (nbOutputs != 1 || nbInputs != kNbInputs) return badArity(nbInputs, nbOutputs);
  nvinfer1::Dims dims[kNbInputs];
  for (int i = 0; i < kNbInputs; ++i) dims[i] = in[i].dims;
  return checkDims(dims) ? 0 : -1;
}

int32_t GateMixPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* /*out*/,
                               void const* const* inputs, void* const* outputs, void* /*workspace*/,
                               cudaStream_t stream) noexcept {
  DType dtype;
  switch (inputDesc[0].type) {
    case DataType::kFLOAT: dtype = DType::kFloat32; break;
    case DataType::kHALF: dtype = DType::kFloat16; break;
    case DataType::kBF16: dtype = DType::kBFloat16; break;
    default: logError("q must be FLOAT, HALF or BF16"); return -1;
  }
  GateMixArgs args{};
  args.q = inputs[0];
  args.q_row_stride = static_cast<int64_t>(params_.num_heads) * params_.head_dim;
  args.positions = static_cast<int32_t const*>(inputs[1]);
  args.global_out = inputs[2];
  args.local_out = inputs[3];
  args.gate_weight = inputs[4];
  args.gate_bias = inputs[5];
  args.out = outputs[0];
  args.num_tokens = inputDesc[0].dims.d[0];
  args.num_heads = params_.num_heads;
  args.head_dim = params_.head_dim;
  args.rope_theta = params_.rope_theta;
  cudaError_t const err = launch_gate_mix(dtype, args, stream);
  if (err != cudaSuccess) {
    logError(std::string("kernel launch failed: ") + cudaGetErrorString(err));
    return -1;
  }
  return 0;
}

nvinfer1::IPluginV3* GateMixPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  return clone();
}

nvinfer1::PluginFieldCollection const* GateMixPlugin::getFieldsToSerialize() noexcept { return &collection_; }

// --------------------------------------------------------------------------------------------------- creator
GateMixPluginCreator::GateMixPluginCreator() : fields_(fieldsOf(nullptr)) {
  collection_.nbFields = static_cast<int32_t>(fields_.size());
  collection_.fields = fields_.data();
}

nvinfer1::IPluginV3* GateMixPluginCreator::createPlugin(char const* /*name*/, nvinfer1::PluginFieldCollection const* fc,
                                                        nvinfer1::TensorRTPhase /*phase*/) noexcept {
  try {
    GateMixParams p;
    bool seen[3] = {false, false, false};
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) continue;
      std::string const name = f.name;
      int const k = name == "num_heads" ? 0 : name == "head_dim" ? 1 : name == "rope_theta" ? 2 : -1;
      if (k < 0) {
        logError("unknown field '" + name + "' (fields: num_heads, head_dim, rope_theta)");
        return nullptr;
      }
      PluginFieldType const want = k == 2 ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32;
      if (f.type != want || f.length != 1 || f.data == nullptr) {
        logError("field '" + name + "' must be one " + (k == 2 ? "FLOAT32" : "INT32") + " value");
        return nullptr;
      }
      if (k == 0) std::memcpy(&p.num_heads, f.data, sizeof(int32_t));
      if (k == 1) std::memcpy(&p.head_dim, f.data, sizeof(int32_t));
      if (k == 2) std::memcpy(&p.rope_theta, f.data, sizeof(float));
      seen[k] = true;
    }
    if (!seen[0] || !seen[1] || !seen[2]) {
      logError("fields num_heads, head_dim and rope_theta are all required");
      return nullptr;
    }
    if (p.num_heads <= 0 || p.head_dim <= 0 || p.head_dim % 2 != 0 || !(p.rope_theta > 0.0f) ||
        !std::isfinite(p.rope_theta)) {
      logError("num_heads > 0, head_dim > 0 and even, rope_theta > 0 and finite required");
      return nullptr;
    }
    return new GateMixPlugin(p);
  } catch (...) {
    return nullptr;
  }
}

}  // namespace loop_gate

LOOP_GATE_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { loop_gate::gLoggerFinder.store(finder); }

LOOP_GATE_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static loop_gate::GateMixPluginCreator creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
