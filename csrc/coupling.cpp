// vflow._C: fused CPU kernels of the mixture-of-logistics coupling, of small-head softmax
// attention (attention_kernels.h) and of the networks' concat-ELU and channel layer norm
// (net_kernels.h).
//
// Contract (see vflow/reference.py): coupling_fwd, coupling_bwd, coupling_inv on CPU,
// contiguous float32/float64 tensors. Work is split into tasks (sample b, chunk of CHUNK
// active positions) run by at::parallel_for; every task writes its own logdet partial, and
// the partials are summed per sample in a fixed order after the loop, so results are
// bitwise identical whatever the number of threads.
//
// The per-task kernels (coupling_kernels.h, attention_kernels.h) are compiled three times, in
// kernels_avx512.cpp (64-byte vectors), kernels_avx2.cpp (32-byte, AVX2+FMA) and
// kernels_generic.cpp (16-byte, baseline), through __attribute__((target)) entry points
// (kernel_entries.h); the widest one the running CPU supports is chosen once at load time
// (__builtin_cpu_supports), so the module never executes an instruction the CPU lacks.
// VFLOW_CPU_ISA=avx512|avx2|generic overrides the choice (tests use it to check fallbacks).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernel_args.h"

namespace vk = vflow_kernels;

namespace {

using vk::AttnFn;
using vk::NetFn;
using vk::KernelSet;
using vk::TaskFn;

#if defined(__x86_64__) || defined(__i386__)
#define VF_X86 1
#endif

KernelSet select_kernels(const std::string& want) {
#ifdef VF_X86
  __builtin_cpu_init();
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("fma");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want == "generic") return vk::generic::kernel_set();
  if (want == "avx2") return has2 ? vk::avx2::kernel_set() : vk::generic::kernel_set();
  if (want == "avx512" || want.empty() || want == "auto") {
    if (has512) return vk::avx512::kernel_set();
    if (has2) return vk::avx2::kernel_set();
  }
#endif
  return vk::generic::kernel_set();
}

KernelSet& kernels() {
  static KernelSet ks = [] {
    const char* env = std::getenv("VFLOW_CPU_ISA");
    return select_kernels(env ? std::string(env) : std::string());
  }();
  return ks;
}

// Runs fn over all tasks in parallel; each worker owns one component buffer.
void run_tasks(TaskFn fn, const vk::KArgs& a) {
  const int64_t ntasks = a.B * a.nchunks;
  if (ntasks == 0) return;
  const int64_t buf_vecs = vk::BUF_PER_K * (a.K > 0 ? a.K : 1);
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    void* buf = std::aligned_alloc(vk::MAX_VEC_BYTES, buf_vecs * vk::MAX_VEC_BYTES);
    TORCH_CHECK(buf != nullptr, "vflow._C: out of memory for a work buffer");
    for (int64_t t = begin; t < end; ++t) fn(a, t, buf);
    std::free(buf);
  });
}

// A contiguous CPU tensor of the given shape and dtype, or an error naming it.
void check_like(const torch::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType dtype,
                const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.sizes() == sizes,
              what, ": ", name, " must be a contiguous CPU tensor of shape ", sizes, " and dtype ", dtype);
}

// Validates shapes, fills the geometry of KArgs. Returns K.
void setup_args(vk::KArgs& a, const torch::Tensor& x, const torch::Tensor& params, int64_t pattern,
                int64_t parity, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && params.device().is_cpu(), what, ": CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, what,
              ": float32 or float64 expected, got ", x.scalar_type());
  TORCH_CHECK(params.scalar_type() == x.scalar_type(), what, ": params dtype ", params.scalar_type(),
              " differs from ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous() && params.is_contiguous(), what, ": contiguous tensors expected");
  TORCH_CHECK(x.dim() >= 1 && params.dim() == x.dim() + 1 - (pattern == 0 ? 0 : 0), what,
              ": params must have one dimension more than x");
  TORCH_CHECK(pattern >= 0 && pattern <= 2, what, ": pattern must be 0, 1 or 2");
  TORCH_CHECK(parity == 0 || parity == 1, what, ": parity must be 0 or 1");
  const int64_t B = x.size(0);
  const int64_t P = params.size(1);
  TORCH_CHECK(P >= 5 && (P - 2) % 3 == 0, what, ": params.shape[1] must be 2 + 3K with K >= 1, got ", P);
  TORCH_CHECK(params.size(0) == B, what, ": batch sizes differ");
  a.B = B;
  a.K = (P - 2) / 3;
  a.pattern = (int)pattern;
  a.parity = (int)parity;
  if (pattern == 0) {
    int64_t N = 1;
    for (int64_t d = 1; d < x.dim(); ++d) {
      TORCH_CHECK(params.size(d + 1) == x.size(d), what, ": params shape ", params.sizes(),
                  " does not match x shape ", x.sizes());
      N *= x.size(d);
    }
    a.N = N;
    a.xstride = N;
  } else {
    TORCH_CHECK(x.dim() == 4, what, ": checkerboard/stripe x must be (B, C, H, W)");
    const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
    TORCH_CHECK(W % 2 == 0, what, ": W must be even");
    TORCH_CHECK(params.size(2) == C && params.size(3) == H && params.size(4) == W / 2, what,
                ": params shape ", params.sizes(), " does not match x shape ", x.sizes());
    a.N = C * H * (W / 2);
    a.H = H;
    a.W = W;
    a.xstride = C * H * W;
  }
  a.nchunks = (a.N + vk::CHUNK - 1) / vk::CHUNK;
}

torch::Tensor reduce_partials(const std::vector<double>& partial, const vk::KArgs& a,
                              at::ScalarType dtype) {
  auto logdet = torch::empty({a.B}, torch::TensorOptions().dtype(at::kDouble));
  double* ld = logdet.data_ptr<double>();
  for (int64_t b = 0; b < a.B; ++b) {
    double s = 0.0;
    for (int64_t c = 0; c < a.nchunks; ++c) s += partial[b * a.nchunks + c];
    ld[b] = s;
  }
  return logdet.to(dtype);
}

std::tuple<torch::Tensor, torch::Tensor> coupling_fwd(const torch::Tensor& x, const torch::Tensor& params,
                                                      bool smooth, int64_t pattern, int64_t parity) {
  vk::KArgs a;
  setup_args(a, x, params, pattern, parity, "coupling_fwd");
  a.smooth = smooth;
  auto y = torch::empty_like(x);
  std::vector<double> partial(a.B * a.nchunks, 0.0);
  a.x = x.data_ptr();
  a.params = params.data_ptr();
  a.out = y.data_ptr();
  a.partial = partial.data();
  {
    pybind11::gil_scoped_release nogil;
    run_tasks(x.scalar_type() == at::kFloat ? kernels().fwd_f : kernels().fwd_d, a);
  }
  return {y, reduce_partials(partial, a, x.scalar_type())};
}

std::tuple<torch::Tensor, torch::Tensor> coupling_bwd(const torch::Tensor& x, const torch::Tensor& params,
                                                      const torch::Tensor& grad_out,
                                                      const torch::Tensor& grad_logdet, bool smooth,
                                                      int64_t pattern, int64_t parity, bool inverse) {
  vk::KArgs a;
  setup_args(a, x, params, pattern, parity, "coupling_bwd");
  check_like(grad_out, "grad_out", x.sizes(), x.scalar_type(), "coupling_bwd");
  check_like(grad_logdet, "grad_logdet", {a.B}, x.scalar_type(), "coupling_bwd");
  a.smooth = smooth;
  a.inverse = inverse;
  auto grad_in = torch::empty_like(x);
  auto grad_params = torch::empty_like(params);
  a.x = x.data_ptr();
  a.params = params.data_ptr();
  a.gout = grad_out.data_ptr();
  a.glogdet = grad_logdet.data_ptr();
  a.gin = grad_in.data_ptr();
  a.gparams = grad_params.data_ptr();
  {
    pybind11::gil_scoped_release nogil;
    run_tasks(x.scalar_type() == at::kFloat ? kernels().bwd_f : kernels().bwd_d, a);
  }
  return {grad_in, grad_params};
}

std::tuple<torch::Tensor, torch::Tensor> coupling_inv(const torch::Tensor& y, const torch::Tensor& params,
                                                      bool smooth, int64_t pattern, int64_t parity,
                                                      int64_t max_iters, bool newton) {
  vk::KArgs a;
  setup_args(a, y, params, pattern, parity, "coupling_inv");
  TORCH_CHECK(max_iters >= 0 && max_iters <= (1 << 20), "coupling_inv: bad max_iters ", max_iters);
  a.smooth = smooth;
  a.newton = newton;
  a.max_iters = (int)max_iters;
  auto x = torch::empty_like(y);
  std::vector<double> partial(a.B * a.nchunks, 0.0);
  a.x = y.data_ptr();
  a.params = params.data_ptr();
  a.out = x.data_ptr();
  a.partial = partial.data();
  {
    pybind11::gil_scoped_release nogil;
    run_tasks(y.scalar_type() == at::kFloat ? kernels().inv_f : kernels().inv_d, a);
  }
  return {x, reduce_partials(partial, a, y.scalar_type())};
}

// --- small-head attention -------------------------------------------------------------------

void run_attention(AttnFn fn, const vk::AArgs& a) {
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, a.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) fn(a, n);
  });
}

// Validates qkv (B, 3, heads, d, T) and fills the geometry of AArgs.
void setup_attn(vk::AArgs& a, const torch::Tensor& qkv, const char* what) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.is_contiguous(), what, ": qkv must be a contiguous CPU tensor");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble, what,
              ": float32 or float64 expected, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(1) == 3, what, ": qkv must have shape (B, 3, heads, d, T), got ",
              qkv.sizes());
  a.heads = qkv.size(2);
  a.d = qkv.size(3);
  a.T = qkv.size(4);
  a.N = qkv.size(0) * a.heads;
  TORCH_CHECK(a.d >= 1 && a.d <= vk::MAX_HEAD_DIM, what, ": head size d must be in [1, ", vk::MAX_HEAD_DIM,
              "], got ", a.d);
  a.scale = 1.0 / std::sqrt((double)a.d);
  a.qkv = qkv.data_ptr();
}

std::tuple<torch::Tensor, torch::Tensor> attention_fwd(const torch::Tensor& qkv) {
  vk::AArgs a;
  setup_attn(a, qkv, "attention_fwd");
  auto out = torch::empty({qkv.size(0), a.heads, a.d, a.T}, qkv.options());
  auto lse = torch::empty({qkv.size(0), a.heads, a.T}, qkv.options());
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  run_attention(qkv.scalar_type() == at::kFloat ? kernels().afwd_f : kernels().afwd_d, a);
  return {out, lse};
}

torch::Tensor attention_bwd(const torch::Tensor& qkv, const torch::Tensor& out, const torch::Tensor& lse,
                            const torch::Tensor& grad_out) {
  vk::AArgs a;
  setup_attn(a, qkv, "attention_bwd");
  const std::vector<int64_t> out_sizes{qkv.size(0), a.heads, a.d, a.T}, lse_sizes{qkv.size(0), a.heads, a.T};
  check_like(out, "out", out_sizes, qkv.scalar_type(), "attention_bwd");
  check_like(grad_out, "grad_out", out_sizes, qkv.scalar_type(), "attention_bwd");
  check_like(lse, "lse", lse_sizes, qkv.scalar_type(), "attention_bwd");
  auto gqkv = torch::empty_like(qkv);
  auto dsum = torch::empty_like(lse);
  a.o = out.data_ptr();
  a.lse = lse.data_ptr();
  a.gout = grad_out.data_ptr();
  a.gqkv = gqkv.data_ptr();
  a.dsum = dsum.data_ptr();
  run_attention(qkv.scalar_type() == at::kFloat ? kernels().abwd_f : kernels().abwd_d, a);
  return gqkv;
}

// --- the networks' concat-ELU and channel layer norm ------------------------------------------

void run_net(NetFn fn, const vk::NArgs& a, int64_t batch) {
  pybind11::gil_scoped_release nogil;
  at::parallel_for(0, batch * a.nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(a, t);
  });
}

// Validates x (B, C, ...) and fills C, N, nchunks. Returns B.
int64_t setup_net(vk::NArgs& a, const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), what, ": x must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, what,
              ": float32 or float64 expected, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, what, ": x must be (B, C, ...), got shape ", x.sizes());
  a.C = x.size(1);
  a.N = x.numel() / std::max<int64_t>(x.size(0) * a.C, 1);
  a.nchunks = (a.N + vk::CHUNK - 1) / vk::CHUNK;
  a.x = x.data_ptr();
  return x.size(0);
}

std::vector<int64_t> doubled_channels(const torch::Tensor& x) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes[1] *= 2;
  return sizes;
}

torch::Tensor concat_elu_fwd(const torch::Tensor& x) {
  vk::NArgs a;
  const int64_t batch = setup_net(a, x, "concat_elu_fwd");
  auto y = torch::empty(doubled_channels(x), x.options());
  a.y = y.data_ptr();
  const bool f = x.scalar_type() == at::kFloat;
  run_net(f ? kernels().celu_fwd_f : kernels().celu_fwd_d, a, batch);
  return y;
}

torch::Tensor concat_elu_bwd(const torch::Tensor& x, const torch::Tensor& grad_y) {
  vk::NArgs a;
  const int64_t batch = setup_net(a, x, "concat_elu_bwd");
  check_like(grad_y, "grad_y", doubled_channels(x), x.scalar_type(), "concat_elu_bwd");
  auto gx = torch::empty_like(x);
  a.gy = grad_y.data_ptr();
  a.gx = gx.data_ptr();
  const bool f = x.scalar_type() == at::kFloat;
  run_net(f ? kernels().celu_bwd_f : kernels().celu_bwd_d, a, batch);
  return gx;
}

torch::Tensor gated_residual_fwd(const torch::Tensor& x, const torch::Tensor& h) {
  vk::NArgs a;
  const int64_t batch = setup_net(a, x, "gated_residual_fwd");
  check_like(h, "h", doubled_channels(x), x.scalar_type(), "gated_residual_fwd");
  auto y = torch::empty_like(x);
  a.h = h.data_ptr();
  a.y = y.data_ptr();
  const bool f = x.scalar_type() == at::kFloat;
  run_net(f ? kernels().gres_fwd_f : kernels().gres_fwd_d, a, batch);
  return y;
}

// dL/dh of y = x + a sigmoid(g), h = (a, g); x is only read for its shape (dL/dx = grad_y).
torch::Tensor gated_residual_bwd(const torch::Tensor& h, const torch::Tensor& grad_y) {
  vk::NArgs a;
  const int64_t batch = setup_net(a, grad_y, "gated_residual_bwd");
  check_like(h, "h", doubled_channels(grad_y), grad_y.scalar_type(), "gated_residual_bwd");
  auto gh = torch::empty_like(h);
  a.h = h.data_ptr();
  a.gy = grad_y.data_ptr();
  a.gx = gh.data_ptr();
  const bool f = grad_y.scalar_type() == at::kFloat;
  run_net(f ? kernels().gres_bwd_f : kernels().gres_bwd_d, a, batch);
  return gh;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> layer_norm_fwd(const torch::Tensor& x,
                                                                       const torch::Tensor& weight,
                                                                       const torch::Tensor& bias, double eps) {
  vk::NArgs a;
  const int64_t batch = setup_net(a, x, "layer_norm_fwd");
  check_like(weight, "weight", {a.C}, x.scalar_type(), "layer_norm_fwd");
  check_like(bias, "bias", {a.C}, x.scalar_type(), "layer_norm_fwd");
  TORCH_CHECK(eps > 0, "layer_norm_fwd: eps must be positive, got ", eps);
  auto y = torch::empty_like(x);
  auto mean = torch::empty({batch, a.N}, x.options());
  auto rstd = torch::empty({batch, a.N}, x.options());
  a.w = weight.data_ptr();
  a.beta = bias.data_ptr();
  a.y = y.data_ptr();
  a.mean = mean.data_ptr();
  a.rstd = rstd.data_ptr();
  a.eps = eps;
  const bool f = x.scalar_type() == at::kFloat;
  run_net(f ? kernels().ln_fwd_f : kernels().ln_fwd_d, a, batch);
  return {y, mean, rstd};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> layer_norm_bwd(const torch::Tensor& x,
                                                                       const torch::Tensor& weight,
                                                                       const torch::Tensor& mean,
                                                                       const torch::Tensor& rstd,
                                                                       const torch::Tensor& grad_y) {
  vk::NArgs a;
  const int64_t batch = setup_net(a, x, "layer_norm_bwd");
  check_like(weight, "weight", {a.C}, x.scalar_type(), "layer_norm_bwd");
  check_like(mean, "mean", {batch, a.N}, x.scalar_type(), "layer_norm_bwd");
  check_like(rstd, "rstd", {batch, a.N}, x.scalar_type(), "layer_norm_bwd");
  check_like(grad_y, "grad_y", x.sizes(), x.scalar_type(), "layer_norm_bwd");
  const int64_t ntasks = batch * a.nchunks;
  std::vector<double> partial(std::max<int64_t>(ntasks, 1) * 2 * a.C, 0.0);
  auto gx = torch::empty_like(x);
  a.w = weight.data_ptr();
  a.mean = mean.data_ptr();
  a.rstd = rstd.data_ptr();
  a.gy = grad_y.data_ptr();
  a.gx = gx.data_ptr();
  a.partial = partial.data();
  const bool f = x.scalar_type() == at::kFloat;
  run_net(f ? kernels().ln_bwd_f : kernels().ln_bwd_d, a, batch);
  // dw, dbeta: the tasks' rows added in task order (independent of the thread count)
  auto dw = torch::zeros({a.C}, torch::TensorOptions().dtype(at::kDouble));
  auto db = torch::zeros({a.C}, torch::TensorOptions().dtype(at::kDouble));
  double* pw = dw.data_ptr<double>();
  double* pb = db.data_ptr<double>();
  for (int64_t t = 0; t < ntasks; ++t) {
    const double* row = partial.data() + t * 2 * a.C;
    for (int64_t c = 0; c < a.C; ++c) {
      pw[c] += row[c];
      pb[c] += row[a.C + c];
    }
  }
  return {gx, dw.to(x.scalar_type()), db.to(x.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused CPU kernels of the MoL coupling (see vflow/reference.py) and of small-head attention";
  m.def("coupling_fwd", &coupling_fwd, "forward coupling -> (y, logdet)", py::arg("x"), py::arg("params"),
        py::arg("smooth"), py::arg("pattern"), py::arg("parity"));
  m.def("coupling_bwd", &coupling_bwd, "vector-Jacobian product -> (grad_in, grad_params)", py::arg("x"),
        py::arg("params"), py::arg("grad_out"), py::arg("grad_logdet"), py::arg("smooth"), py::arg("pattern"),
        py::arg("parity"), py::arg("inverse"));
  m.def("coupling_inv", &coupling_inv, "inverse coupling -> (x, logdet)", py::arg("y"), py::arg("params"),
        py::arg("smooth"), py::arg("pattern"), py::arg("parity"), py::arg("max_iters"), py::arg("newton"));
  m.def("attention_fwd", &attention_fwd, "small-head softmax attention, qkv (B, 3, heads, d, T) -> (out, lse)",
        py::arg("qkv"));
  m.def("attention_bwd", &attention_bwd, "attention vector-Jacobian product -> grad_qkv", py::arg("qkv"),
        py::arg("out"), py::arg("lse"), py::arg("grad_out"));
  m.attr("ATTENTION_MAX_HEAD_DIM") = vk::MAX_HEAD_DIM;
  m.def("concat_elu_fwd", &concat_elu_fwd, "elu(cat([x, -x], 1)), x (B, C, ...) -> (B, 2C, ...)",
        py::arg("x"));
  m.def("concat_elu_bwd", &concat_elu_bwd, "concat-ELU vector-Jacobian product -> grad_x", py::arg("x"),
        py::arg("grad_y"));
  m.def("gated_residual_fwd", &gated_residual_fwd, "x + a * sigmoid(g), h = (a, g) along dim 1",
        py::arg("x"), py::arg("h"));
  m.def("gated_residual_bwd", &gated_residual_bwd, "gated residual vector-Jacobian product -> grad_h",
        py::arg("h"), py::arg("grad_y"));
  m.def("layer_norm_fwd", &layer_norm_fwd, "layer norm over dim 1 of (B, C, ...) -> (y, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_bwd", &layer_norm_bwd, "layer norm vector-Jacobian product -> (grad_x, grad_w, grad_b)",
        py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("grad_y"));
  m.def("_isa", [] { return std::string(kernels().name); }, "instruction set of the kernels in use");
  m.def("_vector_bytes", [] { return kernels().vector_bytes; },
        "vector width of the kernels in use, in bytes (lanes per block: this / element size)");
}
