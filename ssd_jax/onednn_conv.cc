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
// call may use (oneDNN's OpenMP team; fewer when XLA runs one device per core).

#include <omp.h>

#include <cstdint>
#include <functional>
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
};

// oneDNN counts dimensions as N, C, H, W whatever the layout, and dilation from 0.
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel,
                      ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding_low, ffi::Span<const int64_t> padding_high,
                      ffi::Span<const int64_t> dilation) {
  return {{x[0], x[3], x[1], x[2]},
          {kernel[3], kernel[2], kernel[0], kernel[1]},
          {y[0], y[3], y[1], y[2]},
          {strides[0], strides[1]},
          {dilation[0] - 1, dilation[1] - 1},
          {padding_low[0], padding_low[1]},
          {padding_high[0], padding_high[1]}};
}

std::string Key(const char* kind, const Geometry& g, int64_t threads) {
  std::ostringstream key;
  key << kind << threads;
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

// The forward description, which the backward primitives also take as a hint.
dnnl::convolution_forward::primitive_desc ForwardDescription(const Geometry& g) {
  dnnl::convolution_forward::desc description(
      dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Plain(g.x, tag::nhwc), Any(g.kernel), Plain(g.y, tag::nhwc), g.strides, g.dilation,
      g.padding_low, g.padding_high);
  return {description, UserScratchpad(), Engine()};
}

// A primitive with its description, built once per geometry and thread count (building one
// takes milliseconds; a train step calls each of them once).
struct Cached {
  dnnl::primitive primitive;
  dnnl::primitive_desc_base description;
};

template <typename Build>
const Cached& Lookup(const std::string& key, Build build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, Cached> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found == cache.end()) found = cache.emplace(key, build()).first;
  return found->second;
}

// Memory for a call's reordered kernels and oneDNN's scratchpad, kept per calling thread.
void* ThreadBuffer(int which, size_t bytes) {
  thread_local std::vector<char> buffers[3];
  if (buffers[which].size() < bytes) buffers[which].resize(bytes);
  return buffers[which].data();
}

// `user` in `wanted`'s layout: itself when the two agree, else a reordered copy.
memory InLayout(const memory& user, const memory::desc& wanted, dnnl::stream& stream) {
  if (user.get_desc() == wanted) return user;
  memory copy(wanted, Engine(), ThreadBuffer(0, wanted.get_size()));
  dnnl::reorder(user, copy).execute(stream, const_cast<memory&>(user), copy);
  return copy;
}

memory Scratchpad(const dnnl::primitive_desc_base& description) {
  const auto desc = description.scratchpad_desc();
  return memory(desc, Engine(), ThreadBuffer(1, desc.get_size()));
}

ffi::Error Run(const std::function<void()>& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& error) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + error.what());
  }
}

void UseThreads(int64_t threads) { omp_set_num_threads(static_cast<int>(threads)); }

}  // namespace

// y = x * kernel.
ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> padding_low, ffi::Span<const int64_t> padding_high,
                       ffi::Span<const int64_t> dilation, int64_t threads) {
  return Run([&] {
    UseThreads(threads);
    const Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), strides,
                                    padding_low, padding_high, dilation);
    const Cached& cached = Lookup(Key("forward", g, threads), [&] {
      auto description = ForwardDescription(g);
      return Cached{dnnl::convolution_forward(description), description};
    });
    dnnl::stream stream(Engine());
    memory user_kernel(Plain(g.kernel, tag::hwio), Engine(), kernel.typed_data());
    memory x_memory(Plain(g.x, tag::nhwc), Engine(), x.typed_data());
    memory y_memory(Plain(g.y, tag::nhwc), Engine(), y->typed_data());
    memory kernel_memory = InLayout(user_kernel, cached.description.weights_desc(), stream);
    cached.primitive.execute(stream, {{DNNL_ARG_SRC, x_memory},
                                      {DNNL_ARG_WEIGHTS, kernel_memory},
                                      {DNNL_ARG_DST, y_memory},
                                      {DNNL_ARG_SCRATCHPAD, Scratchpad(cached.description)}});
    stream.wait();
  });
}

// d loss / d x, from d loss / d y and the kernel.
ffi::Error ConvInputGradient(ffi::Buffer<ffi::F32> y_gradient, ffi::Buffer<ffi::F32> kernel,
                             ffi::ResultBuffer<ffi::F32> x_gradient,
                             ffi::Span<const int64_t> strides,
                             ffi::Span<const int64_t> padding_low,
                             ffi::Span<const int64_t> padding_high,
                             ffi::Span<const int64_t> dilation, int64_t threads) {
  return Run([&] {
    UseThreads(threads);
    const Geometry g = MakeGeometry(x_gradient->dimensions(), kernel.dimensions(),
                                    y_gradient.dimensions(), strides, padding_low, padding_high,
                                    dilation);
    const Cached& cached = Lookup(Key("input_gradient", g, threads), [&] {
      dnnl::convolution_backward_data::desc description(
          dnnl::algorithm::convolution_direct, Plain(g.x, tag::nhwc), Any(g.kernel),
          Plain(g.y, tag::nhwc), g.strides, g.dilation, g.padding_low, g.padding_high);
      dnnl::convolution_backward_data::primitive_desc built(description, UserScratchpad(),
                                                            Engine(), ForwardDescription(g));
      return Cached{dnnl::convolution_backward_data(built), built};
    });
    dnnl::stream stream(Engine());
    memory user_kernel(Plain(g.kernel, tag::hwio), Engine(), kernel.typed_data());
    memory kernel_memory = InLayout(user_kernel, cached.description.weights_desc(), stream);
    memory y_gradient_memory(Plain(g.y, tag::nhwc), Engine(), y_gradient.typed_data());
    memory x_gradient_memory(Plain(g.x, tag::nhwc), Engine(), x_gradient->typed_data());
    cached.primitive.execute(stream, {{DNNL_ARG_DIFF_DST, y_gradient_memory},
                                      {DNNL_ARG_WEIGHTS, kernel_memory},
                                      {DNNL_ARG_DIFF_SRC, x_gradient_memory},
                                      {DNNL_ARG_SCRATCHPAD, Scratchpad(cached.description)}});
    stream.wait();
  });
}

// d loss / d kernel, from x and d loss / d y.
ffi::Error ConvKernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y_gradient,
                              ffi::ResultBuffer<ffi::F32> kernel_gradient,
                              ffi::Span<const int64_t> strides,
                              ffi::Span<const int64_t> padding_low,
                              ffi::Span<const int64_t> padding_high,
                              ffi::Span<const int64_t> dilation, int64_t threads) {
  return Run([&] {
    UseThreads(threads);
    const Geometry g = MakeGeometry(x.dimensions(), kernel_gradient->dimensions(),
                                    y_gradient.dimensions(), strides, padding_low, padding_high,
                                    dilation);
    const Cached& cached = Lookup(Key("kernel_gradient", g, threads), [&] {
      dnnl::convolution_backward_weights::desc description(
          dnnl::algorithm::convolution_direct, Plain(g.x, tag::nhwc), Any(g.kernel),
          Plain(g.y, tag::nhwc), g.strides, g.dilation, g.padding_low, g.padding_high);
      dnnl::convolution_backward_weights::primitive_desc built(description, UserScratchpad(),
                                                               Engine(), ForwardDescription(g));
      return Cached{dnnl::convolution_backward_weights(built), built};
    });
    dnnl::stream stream(Engine());
    const auto gradient_layout = cached.description.diff_weights_desc();
    memory user_gradient(Plain(g.kernel, tag::hwio), Engine(), kernel_gradient->typed_data());
    memory gradient_memory = gradient_layout == user_gradient.get_desc()
                                 ? user_gradient
                                 : memory(gradient_layout, Engine(),
                                          ThreadBuffer(2, gradient_layout.get_size()));
    memory x_memory(Plain(g.x, tag::nhwc), Engine(), x.typed_data());
    memory y_gradient_memory(Plain(g.y, tag::nhwc), Engine(), y_gradient.typed_data());
    cached.primitive.execute(stream, {{DNNL_ARG_SRC, x_memory},
                                      {DNNL_ARG_DIFF_DST, y_gradient_memory},
                                      {DNNL_ARG_DIFF_WEIGHTS, gradient_memory},
                                      {DNNL_ARG_SCRATCHPAD, Scratchpad(cached.description)}});
    if (gradient_memory != user_gradient)
      dnnl::reorder(gradient_memory, user_gradient).execute(stream, gradient_memory,
                                                            user_gradient);
    stream.wait();
  });
}

// Each handler takes two float32 arrays and returns one.
#define SSD_CONV_BINDING                                 \
  ffi::Ffi::Bind()                                       \
      .Arg<ffi::Buffer<ffi::F32>>()                      \
      .Arg<ffi::Buffer<ffi::F32>>()                      \
      .Ret<ffi::Buffer<ffi::F32>>()                      \
      .Attr<ffi::Span<const int64_t>>("strides")         \
      .Attr<ffi::Span<const int64_t>>("padding_low")     \
      .Attr<ffi::Span<const int64_t>>("padding_high")    \
      .Attr<ffi::Span<const int64_t>>("dilation")        \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsdConvForward, ConvForward, SSD_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsdConvInputGradient, ConvInputGradient,
                              SSD_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(SsdConvKernelGradient, ConvKernelGradient,
                              SSD_CONV_BINDING);
