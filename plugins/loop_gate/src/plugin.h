// IQuestLoopGateMix: the loop's gated mix as a TensorRT IPluginV3 (TensorRT 10; the interfaces are
// NvInferRuntime.h's IPluginV3OneCore/Build/Runtime and IPluginCreatorV3One, header-only, so the library
// needs no libnvinfer symbol: plugin.cpp exports getCreators / setLoggerFinder for
// IPluginRegistry::loadLibrary, register.cpp is the REGISTER_TENSORRT_PLUGIN variant for LD_PRELOAD).
//
// The interface is fixed in trtllm_loop/kernels/gate_mix.py (PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE,
// PLUGIN_FIELDS): fields num_heads (INT32), head_dim (INT32), rope_theta (FLOAT32); inputs, in this order,
//   0 q [N, H, D] (pre-RoPE), 1 positions [N] int32, 2 global_out [N, H, D], 3 local_out [N, H, D],
//   4 gate_weight [H, D], 5 gate_bias [H];
// one output [N, H, D] in q's dtype (FLOAT, HALF or BF16, all float tensors alike), linear format.
#pragma once

#include <string>
#include <vector>

#include "NvInferRuntime.h"

namespace loop_gate {

constexpr char const* kPluginName = "IQuestLoopGateMix";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";
constexpr int32_t kNbInputs = 6;

struct GateMixParams {
  int32_t num_heads = 0;
  int32_t head_dim = 0;
  float rope_theta = 0.0f;
};

class GateMixPlugin final : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit GateMixPlugin(GateMixParams params);
  GateMixPlugin(GateMixPlugin const& other);
  ~GateMixPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;
  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return 1; }
  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  GateMixParams const& params() const { return params_; }

 private:
  bool checkDims(nvinfer1::Dims const* dims) const;  // dims of the 6 inputs
  GateMixParams params_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
};

class GateMixPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  GateMixPluginCreator();
  ~GateMixPluginCreator() override = default;
  char const* getPluginName() const noexcept override { return kPluginName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }
  // nullptr (with the reason logged) for a missing, mistyped or out-of-range field
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection collection_{};
};

// logs through the ILogger that TensorRT handed to setLoggerFinder (nothing before that)
void logError(std::string const& message) noexcept;

}  // namespace loop_gate
