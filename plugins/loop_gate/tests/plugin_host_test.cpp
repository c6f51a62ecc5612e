// Drives libiquest_loop_gate.so through the TensorRT 10 plugin interfaces on a machine without a GPU and
// without libnvinfer, and prints what it sees as one JSON object (tests/test_gate_plugin.py asserts on it;
// this program holds no expected value).
//
//   plugin_host_test LIB H D THETA [PRELOAD_LIB]
//
// The interfaces are header-only (NvInferRuntime.h), so dlopen(RTLD_NOW) succeeding already shows the library
// needs no libnvinfer symbol. IDimensionExpr is a non-virtual wrapper over apiv::VDimensionExpr
// (NvInferImpl.h): FakeExpr supplies that implementation. With PRELOAD_LIB, this executable exports the one
// libnvinfer symbol REGISTER_TENSORRT_PLUGIN calls, getPluginRegistry(), returning a recording registry.
// enqueue is never called (it needs a GPU: bench/gpu_gate.sh).
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "NvInferRuntime.h"
#include "gate_math.h"

using namespace nvinfer1;

namespace {

std::string q(std::string const& s) {
  std::string o = "\"";
  for (char c : s) o += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
  return o + "\"";
}
std::string info(InterfaceInfo const& i) {
  return "{\"kind\": " + q(i.kind) + ", \"major\": " + std::to_string(i.major) + ", \"minor\": " +
         std::to_string(i.minor) + "}";
}
std::string fmt(float v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.9g", v);
  return b;
}

struct Logger : ILogger {
  std::vector<std::string> errors;
  void log(Severity s, AsciiChar const* msg) noexcept override {
    if (s <= Severity::kERROR) errors.push_back(msg);
  }
} gLogger;
struct Finder : ILoggerFinder {
  ILogger* findLogger() override { return &gLogger; }
} gFinder;

class FakeImpl : public apiv::VDimensionExpr {
 public:
  FakeImpl(bool c, int64_t v) : c_(c), v_(v) {}
  bool isConstant() const override { return c_; }
  int64_t getConstantValue() const override { return v_; }
  bool isSizeTensor() const override { return false; }
 private:
  bool c_;
  int64_t v_;
};
class FakeExpr : public IDimensionExpr {
 public:
  FakeExpr(bool c, int64_t v) : impl_(c, v) { mImpl = &impl_; }
  ~FakeExpr() noexcept override = default;
 private:
  FakeImpl impl_;
};
class NoBuilder : public IExprBuilder {};  // the plugin must not build expressions (its output is q's shape)

Dims dims(std::vector<int64_t> v) {
  Dims d{};
  d.nbDims = static_cast<int32_t>(v.size());
  for (size_t i = 0; i < v.size(); ++i) d.d[i] = v[i];
  return d;
}

// the shapes of the six inputs for N tokens (N = -1: dynamic, as at build time)
std::vector<Dims> inputDims(int64_t N, int64_t H, int64_t D) {
  return {dims({N, H, D}), dims({N}), dims({N, H, D}), dims({N, H, D}), dims({H, D}), dims({H})};
}

std::string fieldsJson(PluginFieldCollection const* fc) {
  std::string s = "[";
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    std::string value = "null";
    if (f.data && f.type == PluginFieldType::kINT32) value = std::to_string(*static_cast<int32_t const*>(f.data));
    if (f.data && f.type == PluginFieldType::kFLOAT32) value = fmt(*static_cast<float const*>(f.data));
    s += std::string(i ? ", " : "") + "{\"name\": " + q(f.name) + ", \"type\": " +
         std::to_string(static_cast<int>(f.type)) + ", \"length\": " + std::to_string(f.length) + ", \"value\": " +
         value + "}";
  }
  return s + "]";
}

// ------------------------------------------------------------------------------- recording plugin registry
struct Registered {
  std::string name, version, ns, plugin_namespace, kind;
};
std::vector<Registered> gRegistered;

class RecordingRegistry : public IPluginRegistry {
 public:
  bool registerCreator(IPluginCreator&, AsciiChar const* const) noexcept override { return false; }
  IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override { *n = 0; return nullptr; }
  IPluginCreator* getPluginCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept
      override { return nullptr; }
  void setErrorRecorder(IErrorRecorder* const) noexcept override {}
  IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
  bool deregisterCreator(IPluginCreator const&) noexcept override { return false; }
  bool isParentSearchEnabled() const override { return false; }
  void setParentSearchEnabled(bool const) override {}
  PluginLibraryHandle loadLibrary(AsciiChar const*) noexcept override { return nullptr; }
  void deregisterLibrary(PluginLibraryHandle) noexcept override {}
  bool registerCreator(IPluginCreatorInterface& c, AsciiChar const* const ns) noexcept override {
    Registered r;
    r.kind = c.getInterfaceInfo().kind;
    r.plugin_namespace = ns ? ns : "<null>";
    if (auto* v3 = dynamic_cast<IPluginCreatorV3One*>(&c)) {
      r.name = v3->getPluginName();
      r.version = v3->getPluginVersion();
      r.ns = v3->getPluginNamespace();
    }
    gRegistered.push_back(r);
    return true;
  }
  IPluginCreatorInterface* const* getAllCreators(int32_t* const n) const noexcept override { *n = 0; return nullptr; }
  IPluginCreatorInterface* getCreator(AsciiChar const* const, AsciiChar const* const, AsciiChar const* const) noexcept
      override { return nullptr; }
  bool deregisterCreator(IPluginCreatorInterface const&) noexcept override { return false; }
  IPluginResource* acquirePluginResource(AsciiChar const*, IPluginResource*) noexcept override { return nullptr; }
  int32_t releasePluginResource(AsciiChar const*) noexcept override { return 0; }
  IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override { *n = 0; return nullptr; }
} gRegistry;

}  // namespace

extern "C" IPluginRegistry* getPluginRegistry() noexcept { return &gRegistry; }

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s LIB H D THETA [PRELOAD_LIB]\n", argv[0]);
    return 2;
  }
  int32_t const H = std::atoi(argv[2]), D = std::atoi(argv[3]);
  float const theta = static_cast<float>(std::atof(argv[4]));
  std::ostringstream out;
  out << "{";

  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::printf("{\"dlopen_error\": %s}\n", q(dlerror()).c_str());
    return 1;
  }
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
  auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
  out << "\"has_getCreators\": " << (getCreators ? "true" : "false")
      << ", \"has_setLoggerFinder\": " << (setLoggerFinder ? "true" : "false");
  if (!getCreators || !setLoggerFinder) {
    std::printf("%s}\n", out.str().c_str());
    return 1;
  }
  setLoggerFinder(&gFinder);

  int32_t nb = -1;
  IPluginCreatorInterface* const* creators = getCreators(nb);
  out << ", \"nb_creators\": " << nb << ", \"creator_interface\": " << info(creators[0]->getInterfaceInfo());
  auto* creator = dynamic_cast<IPluginCreatorV3One*>(creators[0]);
  if (!creator) {
    std::printf("%s}\n", out.str().c_str());
    return 1;
  }
  out << ", \"creator\": {\"name\": " << q(creator->getPluginName()) << ", \"version\": "
      << q(creator->getPluginVersion()) << ", \"namespace\": " << q(creator->getPluginNamespace())
      << ", \"fields\": " << fieldsJson(creator->getFieldNames()) << "}";

  // ---- create from fields, as a TensorRT network definition would
  PluginField fs[] = {PluginField("num_heads", &H, PluginFieldType::kINT32, 1),
                      PluginField("head_dim", &D, PluginFieldType::kINT32, 1),
                      PluginField("rope_theta", &theta, PluginFieldType::kFLOAT32, 1)};
  PluginFieldCollection fc{3, fs};
  std::unique_ptr<IPluginV3> plugin(creator->createPlugin("gate", &fc, TensorRTPhase::kBUILD));
  if (!plugin) {
    std::printf("%s, \"create_failed\": true, \"errors\": %zu}\n", out.str().c_str(), gLogger.errors.size());
    return 1;
  }
  auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
  auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
  auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  out << ", \"plugin_interface\": " << info(plugin->getInterfaceInfo()) << ", \"capabilities\": ["
      << info(core->getInterfaceInfo()) << ", " << info(build->getInterfaceInfo()) << ", "
      << info(runtime->getInterfaceInfo()) << "]";
  out << ", \"core\": {\"name\": " << q(core->getPluginName()) << ", \"version\": " << q(core->getPluginVersion())
      << ", \"namespace\": " << q(core->getPluginNamespace()) << "}";

  // ---- build-time queries
  out << ", \"nb_outputs\": " << build->getNbOutputs();
  out << ", \"output_types\": [";
  DataType const probes[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16, DataType::kINT32, DataType::kINT8};
  for (size_t i = 0; i < sizeof probes / sizeof probes[0]; ++i) {
    DataType ins[6] = {probes[i], DataType::kINT32, probes[i], probes[i], probes[i], probes[i]};
    DataType o = DataType::kINT64;
    int32_t rc = build->getOutputDataTypes(&o, 1, ins, 6);
    out << (i ? ", " : "") << "{\"in\": " << static_cast<int>(probes[i]) << ", \"rc\": " << rc
        << ", \"out\": " << (rc == 0 ? static_cast<int>(o) : -1) << "}";
  }
  out << "]";

  {  // output shape: N symbolic, H and D constant -> the output's expressions are q's
    FakeExpr n(false, 0), h(true, H), d(true, D), wrong_d(true, D + 2);
    DimsExprs in[6];
    in[0].nbDims = 3;
    in[0].d[0] = &n;
    in[0].d[1] = &h;
    in[0].d[2] = &d;
    DimsExprs o{};
    NoBuilder builder;
    int32_t rc = build->getOutputShapes(in, 6, nullptr, 0, &o, 1, builder);
    bool same = rc == 0 && o.nbDims == 3 && o.d[0] == &n && o.d[1] == &h && o.d[2] == &d;
    in[0].d[2] = &wrong_d;
    int32_t rc_wrong = build->getOutputShapes(in, 6, nullptr, 0, &o, 1, builder);
    in[0].nbDims = 2;
    int32_t rc_2d = build->getOutputShapes(in, 6, nullptr, 0, &o, 1, builder);
    int32_t rc_arity = build->getOutputShapes(in, 5, nullptr, 0, &o, 1, builder);
    out << ", \"output_shape\": {\"rc\": " << rc << ", \"is_q_shape\": " << (same ? "true" : "false")
        << ", \"rc_wrong_head_dim\": " << rc_wrong << ", \"rc_2d_q\": " << rc_2d << ", \"rc_5_inputs\": " << rc_arity
        << "}";
  }

  {  // format combinations: every (position, dtype) with q of each float dtype
    out << ", \"formats\": [";
    DataType const types[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16, DataType::kINT32, DataType::kINT64};
    bool first = true;
    for (DataType qt : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
      for (int pos = 0; pos < 7; ++pos) {
        for (DataType t : types) {
          DynamicPluginTensorDesc io[7]{};
          for (auto& x : io) {
            x.desc.format = TensorFormat::kLINEAR;
            x.desc.type = qt;
          }
          io[1].desc.type = DataType::kINT32;
          io[pos].desc.type = t;
          out << (first ? "" : ", ") << "[" << static_cast<int>(qt) << ", " << pos << ", " << static_cast<int>(t)
              << ", " << (build->supportsFormatCombination(pos, io, 6, 1) ? 1 : 0) << "]";
          first = false;
        }
      }
    }
    DynamicPluginTensorDesc io[7]{};
    for (auto& x : io) x.desc.type = DataType::kHALF;
    io[1].desc.type = DataType::kINT32;
    io[3].desc.format = TensorFormat::kCHW32;
    out << "], \"format_non_linear\": " << (build->supportsFormatCombination(3, io, 6, 1) ? 1 : 0);
  }

  {  // configurePlugin at build time (dynamic N) and onShapeChange at run time (N = 5)
    auto run = [&](std::vector<Dims> const& ds, int32_t nbIn) {
      DynamicPluginTensorDesc in[6]{}, o[1]{};
      for (int i = 0; i < 6; ++i) in[i].desc.dims = ds[i];
      o[0].desc.dims = ds[0];
      return build->configurePlugin(in, nbIn, o, 1);
    };
    auto shape = [&](std::vector<Dims> const& ds) {
      PluginTensorDesc in[6]{}, o[1]{};
      for (int i = 0; i < 6; ++i) in[i].dims = ds[i];
      o[0].dims = ds[0];
      return runtime->onShapeChange(in, 6, o, 1);
    };
    std::vector<Dims> bad_bias = inputDims(-1, H, D);
    bad_bias[5] = dims({H + 1});
    std::vector<Dims> bad_n = inputDims(5, H, D);
    bad_n[1] = dims({4});
    out << ", \"configure\": {\"ok\": " << run(inputDims(-1, H, D), 6) << ", \"bad_bias\": " << run(bad_bias, 6)
        << ", \"bad_heads\": " << run(inputDims(-1, H + 1, D), 6) << ", \"five_inputs\": " << run(inputDims(-1, H, D), 5)
        << ", \"on_shape_change\": " << shape(inputDims(5, H, D)) << ", \"on_shape_change_bad_n\": " << shape(bad_n)
        << "}";
  }

  {  // serialization round trip: fields -> createPlugin(kRUNTIME) -> fields; clone; attachToContext
    PluginFieldCollection const* ser = runtime->getFieldsToSerialize();
    std::vector<std::vector<char>> blobs;  // what an engine file would keep: names and bytes
    std::vector<PluginField> copy;
    std::vector<std::string> names;
    names.reserve(ser->nbFields);
    for (int32_t i = 0; i < ser->nbFields; ++i) {
      PluginField const& f = ser->fields[i];
      size_t bytes = f.type == PluginFieldType::kFLOAT32 || f.type == PluginFieldType::kINT32 ? 4 * f.length : 0;
      blobs.emplace_back(static_cast<char const*>(f.data), static_cast<char const*>(f.data) + bytes);
      names.emplace_back(f.name);
    }
    for (int32_t i = 0; i < ser->nbFields; ++i)
      copy.emplace_back(names[i].c_str(), blobs[i].data(), ser->fields[i].type, ser->fields[i].length);
    std::string serialized = fieldsJson(ser);
    PluginFieldCollection back{static_cast<int32_t>(copy.size()), copy.data()};
    std::unique_ptr<IPluginV3> restored(creator->createPlugin("gate", &back, TensorRTPhase::kRUNTIME));
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    std::unique_ptr<IPluginV3> attached(runtime->attachToContext(nullptr));
    auto fieldsOf = [](IPluginV3* p) {
      auto* r = static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
      return fieldsJson(r->getFieldsToSerialize());
    };
    plugin.reset();  // the copies must not point into the original
    out << ", \"serialized\": " << serialized << ", \"restored\": " << (restored ? fieldsOf(restored.get()) : "null")
        << ", \"cloned\": " << (cloned ? fieldsOf(cloned.get()) : "null")
        << ", \"attached\": " << (attached ? fieldsOf(attached.get()) : "null");
  }

  {  // creator refusals, each with one logged error
    int32_t const zero = 0, odd = D + 1, two = 2;
    float const bad_theta = -1.0f;
    struct Case {
      char const* name;
      std::vector<PluginField> f;
    };
    std::vector<Case> cases = {
        {"missing_head_dim", {fs[0], fs[2]}},
        {"head_dim_int8", {fs[0], PluginField("head_dim", &D, PluginFieldType::kINT8, 1), fs[2]}},
        {"theta_as_int32", {fs[0], fs[1], PluginField("rope_theta", &two, PluginFieldType::kINT32, 1)}},
        {"odd_head_dim", {fs[0], PluginField("head_dim", &odd, PluginFieldType::kINT32, 1), fs[2]}},
        {"zero_heads", {PluginField("num_heads", &zero, PluginFieldType::kINT32, 1), fs[1], fs[2]}},
        {"negative_theta", {fs[0], fs[1], PluginField("rope_theta", &bad_theta, PluginFieldType::kFLOAT32, 1)}},
        {"unknown_field", {fs[0], fs[1], fs[2], PluginField("window", &two, PluginFieldType::kINT32, 1)}},
        {"two_values", {PluginField("num_heads", fs[0].data, PluginFieldType::kINT32, 2), fs[1], fs[2]}},
    };
    out << ", \"refused\": {";
    for (size_t i = 0; i < cases.size(); ++i) {
      gLogger.errors.clear();
      PluginFieldCollection c{static_cast<int32_t>(cases[i].f.size()), cases[i].f.data()};
      std::unique_ptr<IPluginV3> p(creator->createPlugin("gate", &c, TensorRTPhase::kBUILD));
      out << (i ? ", " : "") << q(cases[i].name) << ": {\"created\": " << (p ? "true" : "false") << ", \"errors\": [";
      for (size_t e = 0; e < gLogger.errors.size(); ++e) out << (e ? ", " : "") << q(gLogger.errors[e]);
      out << "]}";
    }
    out << "}";
  }

  {  // the in-kernel RoPE frequencies (gate_math.h is __host__ __device__; the CUDA kernel computes these)
    out << ", \"inv_freq\": [";
    for (int i = 0; i < D / 2; ++i) out << (i ? ", " : "") << fmt(loop_gate::rope_inv_freq(i, D, theta));
    out << "]";
  }

  if (argc > 5) {  // the LD_PRELOAD library: its static registrar must call getPluginRegistry()->registerCreator
    void* pre = dlopen(argv[5], RTLD_NOW | RTLD_GLOBAL);
    out << ", \"preload\": ";
    if (!pre) {
      out << "{\"dlopen_error\": " << q(dlerror()) << "}";
    } else {
      out << "[";
      for (size_t i = 0; i < gRegistered.size(); ++i)
        out << (i ? ", " : "") << "{\"kind\": " << q(gRegistered[i].kind) << ", \"name\": " << q(gRegistered[i].name)
            << ", \"version\": " << q(gRegistered[i].version) << ", \"namespace\": " << q(gRegistered[i].ns)
            << ", \"registry_namespace\": " << q(gRegistered[i].plugin_namespace) << "}";
      out << "]";
    }
  }
  std::printf("%s}\n", out.str().c_str());
  return 0;
}
