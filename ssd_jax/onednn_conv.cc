// Convolutions on a CPU by oneDNN, as XLA FFI handlers (`ssd_jax.onednn` compiles this file
// against the system's oneDNN and registers the handlers with JAX).
//
// Why: XLA's CPU convolutions (YNNPACK) run SSD300's 3x3 layers 8% to 20% slower than
// oneDNN's, which torchvision uses (docs/cpu_speed.md, "oneDNN convolutions").
//
// Layouts: x and y are NHWC, the kernel HWIO, all float32, as in `lax.conv_general_dilated`
// with dimension_numbers ("NHWC", "HWIO", "NHWC"). oneDNN picks its own kernel layout
// (format_tag::any); the kernel is reordered into it at each call, a small cost beside the
// convolution (9.4 MB for a 3x3, 512 -> 512 kernel).
//
// Attributes, each an int64 array of the two spatial axes: strides; padding_low and
// padding_high (zeros added before and after); dilation (1 = none). `threads`: the cores one
// call may use (oneDNN's OpenMP team; fewer when XLA runs one device per core). `winograd`:
// oneDNN's Winograd F(4x4, 3x3) convolution where it applies (3x3, stride 1, undilated),
// 2.2x to 2.7x as fast as the direct one at SSD300's sizes, with rounding errors no larger
// (docs/cpu_speed.md).

#include <omp.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;

namespace {

struct Geometry {
  memory::dims x, kernel, y, strides, dilation, padding_low, padding_high;
  bool winograd;
};

// oneDNN counts dimensions as N, C, H, W whatever the layout, and dilation from 0.
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding_low, ffi::Span<const int64_t> padding_high,
                      ffi::Span<const int64_t> dilation, bool winograd) {
  return {{x[0], x[3], x[1], x[2]},
          {kernel[3], kernel[2], kernel[0], kernel[1]},
          {y[0], y[3], y[1], y[2]},
          {strides[0], strides[1]},
          {dilation[0] - 1, dilation[1] - 1},
          {padding_low[0], padding_low[1]},
          {padding_high[0], padding_high[1]},
          winograd};
}

std::string Key(int kind, const Geometry& g, int64_t threads) {
  std::ostringstream key;
  key << kind << threads << g.winograd;
  for (const auto* dims : {&g.x, &g.kernel, &g.y, &g.strides, &g.dilation, &g.padding_low,
                           &g.padding_high})
    for (auto d : *dims) key << ',' << d;
  return key.str();
}

const dnnl::engine& Engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::desc Plain(const memory::dims& dims, tag layout) {
  return memory::desc(dims, memory::data_type::f32, layout);
}

memory::desc Any(const memory::dims& dims) { return Plain(dims, tag::any); }

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// What a call computes, with the oneDNN arguments of its two operands and of its result.
enum Kind { kForward, kInputGradient, kKernelGradient };
constexpr int kArguments[3][3] = {
    {DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST},
    {DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC},
    {DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS}};

// The direct convolution runs on the arrays' own layouts. Winograd's wants oneDNN's blocked
// layouts for the maps too (the maps are reordered into and out of them at each call).
memory::desc MapLayout(const memory::dims& dims, dnnl::algorithm algorithm) {
  return algorithm == dnnl::algorithm::convolution_winograd ? Any(dims) : Plain(dims, tag::nhwc);
}

// The forward description, which the backward primitives also take as a hint.
// oneDNN 3 takes the engine and the geometry in the primitive descriptor itself; oneDNN 2
// in an operation descriptor first.
dnnl::convolution_forward::primitive_desc ForwardDescription(const Geometry& g,
                                                             dnnl::algorithm algorithm) {
#if DNNL_VERSION_MAJOR >= 3
  return {Engine(), dnnl::prop_kind::forward_training, algorithm, MapLayout(g.x, algorithm),
          Any(g.kernel), MapLayout(g.y, algorithm), g.strides, g.dilation, g.padding_low,
          g.padding_high, UserScratchpad()};
#else
  dnnl::convolution_forward::desc description(
      dnnl::prop_kind::forward_training, algorithm, MapLayout(g.x, algorithm), Any(g.kernel),
      MapLayout(g.y, algorithm), g.strides, g.dilation, g.padding_low, g.padding_high);
  return {description, UserScratchpad(), Engine()};
#endif
}

// A primitive with its description.
struct Cached {
  dnnl::primitive primitive;
  dnnl::primitive_desc_base description;
};

Cached Build(Kind kind, const Geometry& g, dnnl::algorithm algorithm) {
  const auto forward = ForwardDescription(g, algorithm);
  const auto x = MapLayout(g.x, algorithm), y = MapLayout(g.y, algorithm);
  if (kind == kForward) return {dnnl::convolution_forward(forward), forward};
#if DNNL_VERSION_MAJOR >= 3
  if (kind == kInputGradient) {
    dnnl::convolution_backward_data::primitive_desc description(
        Engine(), algorithm, x, Any(g.kernel), y, g.strides, g.dilation, g.padding_low,
        g.padding_high, forward, UserScratchpad());
    return {dnnl::convolution_backward_data(description), description};
  }
  dnnl::convolution_backward_weights::primitive_desc description(
      Engine(), algorithm, x, Any(g.kernel), y, g.strides, g.dilation, g.padding_low,
      g.padding_high, forward, UserScratchpad());
#else
  if (kind == kInputGradient) {
    dnnl::convolution_backward_data::primitive_desc description(
        {algorithm, x, Any(g.kernel), y, g.strides, g.dilation, g.padding_low, g.padding_high},
        UserScratchpad(), Engine(), forward);
    return {dnnl::convolution_backward_data(description), description};
  }
  dnnl::convolution_backward_weights::primitive_desc description(
      {algorithm, x, Any(g.kernel), y, g.strides, g.dilation, g.padding_low, g.padding_high},
      UserScratchpad(), Engine(), forward);
#endif
  return {dnnl::convolution_backward_weights(description), description};
}

// Winograd's takes 3x3 stride-1 undilated convolutions, and not every channel count: the
// others get the direct convolution.
Cached BuildPreferred(Kind kind, const Geometry& g) {
  if (g.winograd) {
    try {
      return Build(kind, g, dnnl::algorithm::convolution_winograd);
    } catch (const dnnl::error&) {
    }
  }
  return Build(kind, g, dnnl::algorithm::convolution_direct);
}

// Built once per geometry and thread count (building takes milliseconds; a train step calls
// each primitive once).
const Cached& Lookup(Kind kind, const Geometry& g, int64_t threads) {
  static std::mutex mutex;
  static std::unordered_map<std::string, Cached> cache;
  const std::string key = Key(kind, g, threads);
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found == cache.end()) found = cache.emplace(key, BuildPreferred(kind, g)).first;
  return found->second;
}

// A block of memory aligned to 64 bytes (oneDNN's Winograd kernels read their scratchpad with
// aligned loads), grown on demand, never shrunk.
class Block {
 public:
  Block() = default;
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  ~Block() { std::free(data_); }

  void* Reserve(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, size_);
      if (data_ == nullptr) {
        size_ = 0;
        throw std::bad_alloc();
      }
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// The memory one call needs for its reordered arrays and oneDNN's scratchpad, taken from a
// pool for the call and returned after. Kept across calls, the blocks are reused as XLA
// reuses its own buffers; kept per thread instead, they multiplied the resident memory (XLA
// runs a call on whichever of its threads is free) and faulted in fresh pages.
class Workspace {
 public:
  static constexpr int kBlocks = 4;  // two operands, the result, the scratchpad

  Workspace() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pool_.empty()) {
      blocks_ = std::make_unique<std::array<Block, kBlocks>>();
    } else {
      blocks_ = std::move(pool_.back());
      pool_.pop_back();
    }
  }
  ~Workspace() {
    std::lock_guard<std::mutex> lock(mutex_);
    pool_.push_back(std::move(blocks_));
  }

  void* Reserve(int which, size_t bytes) { return (*blocks_)[which].Reserve(bytes); }

 private:
  std::unique_ptr<std::array<Block, kBlocks>> blocks_;
  static inline std::mutex mutex_;
  static inline std::vector<std::unique_ptr<std::array<Block, kBlocks>>> pool_;
};

// An argument's array as XLA holds it: maps NHWC, kernels HWIO.
memory UserMemory(int argument, const Geometry& g, void* data) {
  switch (argument) {
    case DNNL_ARG_SRC:
    case DNNL_ARG_DIFF_SRC:
      return memory(Plain(g.x, tag::nhwc), Engine(), data);
    case DNNL_ARG_DST:
    case DNNL_ARG_DIFF_DST:
      return memory(Plain(g.y, tag::nhwc), Engine(), data);
    default:
      return memory(Plain(g.kernel, tag::hwio), Engine(), data);
  }
}

// Holds `threads` of the process's cores for one call, waiting until they are free. XLA may
// run independent convolutions at once (SSD's heads), each on one of its threads; each call
// would start an OpenMP team of its own, more threads than cores, which slow each other down.
class Cores {
 public:
  explicit Cores(int64_t threads) : held_(std::min<int64_t>(threads, omp_get_num_procs())) {
    std::unique_lock<std::mutex> lock(mutex_);
    freed_.wait(lock, [&] { return in_use_ + held_ <= omp_get_num_procs(); });
    in_use_ += held_;
  }
  ~Cores() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= held_;
    }
    freed_.notify_all();
  }

 private:
  const int64_t held_;
  static inline std::mutex mutex_;
  static inline std::condition_variable freed_;
  static inline int64_t in_use_ = 0;
};

// out = the `kind` convolution of `first` and `second`, each array reordered into (or, for
// the result, out of) the layout the primitive picked, where that is not XLA's.
void Convolve(Kind kind, const Geometry& g, int64_t threads, const float* first,
              const float* second, float* out) {
  omp_set_num_threads(static_cast<int>(threads));
  const Cached& cached = Lookup(kind, g, threads);
  Cores cores(threads);
  Workspace workspace;
  dnnl::stream stream(Engine());
  std::unordered_map<int, memory> arguments;
  const float* operands[2] = {first, second};
  for (int i = 0; i < 2; ++i) {
    const int argument = kArguments[kind][i];
    memory user = UserMemory(argument, g, const_cast<float*>(operands[i]));
    const auto wanted = cached.description.query_md(dnnl::query::exec_arg_md, argument);
    if (user.get_desc() == wanted) {
      arguments.emplace(argument, user);
      continue;
    }
    memory copy(wanted, Engine(), workspace.Reserve(i, wanted.get_size()));
    dnnl::reorder(user, copy).execute(stream, user, copy);
    arguments.emplace(argument, copy);
  }
  const int result_argument = kArguments[kind][2];
  memory user_result = UserMemory(result_argument, g, out);
  const auto wanted = cached.description.query_md(dnnl::query::exec_arg_md, result_argument);
  memory result = user_result.get_desc() == wanted
                      ? user_result
                      : memory(wanted, Engine(), workspace.Reserve(2, wanted.get_size()));
  arguments.emplace(result_argument, result);
  const auto scratchpad = cached.description.scratchpad_desc();
  arguments.emplace(DNNL_ARG_SCRATCHPAD,
                    memory(scratchpad, Engine(), workspace.Reserve(3, scratchpad.get_size())));
  cached.primitive.execute(stream, arguments);
  if (result != user_result) dnnl::reorder(result, user_result).execute(stream, result,
                                                                        user_result);
  stream.wait();
}

// One handler per kind: two float32 operands, one float32 result (the attributes above).
template <Kind kind>
ffi::Error Handler(ffi::Buffer<ffi::F32> first, ffi::Buffer<ffi::F32> second,
                   ffi::ResultBuffer<ffi::F32> out, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> padding_low, ffi::Span<const int64_t> padding_high,
                   ffi::Span<const int64_t> dilation, int64_t threads, bool winograd) {
  // Which array holds x's, the kernel's and y's dimensions.
  const auto x = kind == kInputGradient ? out->dimensions() : first.dimensions();
  const auto kernel = kind == kKernelGradient ? out->dimensions() : second.dimensions();
  const auto y = kind == kForward         ? out->dimensions()
                 : kind == kInputGradient ? first.dimensions()
                                          : second.dimensions();
  try {
    Convolve(kind,
             MakeGeometry(x, kernel, y, strides, padding_low, padding_high, dilation, winograd),
             threads, first.typed_data(), second.typed_data(), out->typed_data());
    return ffi::Error::Success();
  } catch (const dnnl::error& error) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + error.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "oneDNN convolution: out of host memory for its workspace");
  }
}

}  // namespace

#define SSD_CONV_BINDING                                 \
  ffi::Ffi::Bind()                                       \
      .Arg<ffi::Buffer<ffi::F32>>()                      \
      .Arg<ffi::Buffer<ffi::F32>>()                      \
      .Ret<ffi::Buffer<ffi::F32>>()                      \
      .Attr<ffi::Span<const int64_t>>("strides")         \
      .Attr<ffi::Span<const int64_t>>("padding_low")     \
      .Attr<ffi::Span<const int64_t>>("padding_high")    \
      .Attr<ffi::Span<const int64_t>>("dilation")        \
      .Attr<int64_t>("threads")                          \
      .Attr<bool>("winograd")

// y = x * kernel; d loss / d x from d loss / d y and the kernel; d loss / d kernel from x and
// d loss / d y.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsdConvForward, Handler<kForward>, SSD_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsdConvInputGradient, Handler<kInputGradient>, SSD_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsdConvKernelGradient, Handler<kKernelGradient>, SSD_CONV_BINDING);
