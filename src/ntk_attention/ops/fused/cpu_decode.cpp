// One NTK-Attention generation step on CPU (a single query row per head, no gradient) in one call.
//
// The same formula as torch_decode.py (its reference and fallback), without a dozen small PyTorch ops
// per layer and token: PyTorch's CPU flash kernel gives the softmax state (O, lse) of the G query
// heads of each key/value group, and one loop per (batch, head) row computes the random features of
// the query (or takes phi from the caller), [N | c] = phi^T [Z | k] and the merge
//
//     out = (O + w N) / (1 + w max(c, 0)),   w = e^{min(-lse, cap)}.
//
// Built on first use by torch.utils.cpp_extension (cpu_kernel.py); no mask (callers drop masks that
// mask nothing and use the PyTorch path for the rest).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
void merge_rows(const at::Tensor& q, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& state,
                const c10::optional<at::Tensor>& phi_in, const c10::optional<at::Tensor>& projection,
                bool normalize, double scale, double cap, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const int64_t H_kv = o.size(1), G = H / H_kv;
  const int64_t r = state.size(1), Dv = state.size(2) - 1;
  const auto q_a = q.accessor<T, 4>();      // [B, H, 1, D]
  const auto o_a = o.accessor<T, 4>();      // [B, H_kv, G, Dv]
  const auto lse_a = lse.accessor<T, 3>();  // [B, H_kv, G]
  const T* state_p = state.data_ptr<T>();   // [H, r, Dv + 1], contiguous
  const T* phi_p = phi_in ? phi_in->data_ptr<T>() : nullptr;           // [B, H, r], contiguous
  const T* w_p = projection ? projection->data_ptr<T>() : nullptr;    // [D, r] times sqrt(scale), contiguous
  T* out_p = out.data_ptr<T>();             // [B, H, 1, Dv], contiguous
  const T log_sqrt_r = static_cast<T>(0.5 * std::log(static_cast<double>(r)));
  const T sqrt_r = static_cast<T>(std::sqrt(static_cast<double>(r)));

  at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> phi(r), stats(Dv + 1);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, h = row % H, kv = h / G, g = h % G;
      if (phi_p != nullptr) {
        std::copy(phi_p + row * r, phi_p + (row + 1) * r, phi.begin());
      } else {  // positive random features: exp(w.x' - |x'|^2 / 2) / sqrt(r), x' = x sqrt(scale)
        std::fill(phi.begin(), phi.end(), T(0));
        T norm2 = 0;
        for (int64_t d = 0; d < D; ++d) {
          const T x = q_a[b][h][0][d];
          norm2 += x * x;
          const T* w_row = w_p + d * r;
          for (int64_t f = 0; f < r; ++f) phi[f] += x * w_row[f];
        }
        if (normalize) {  // sqrt(r) softmax_f(w.x')
          const T top = *std::max_element(phi.begin(), phi.end());
          T sum = 0;
          for (int64_t f = 0; f < r; ++f) sum += (phi[f] = std::exp(phi[f] - top));
          const T factor = sqrt_r / sum;
          for (int64_t f = 0; f < r; ++f) phi[f] *= factor;
        } else {
          const T shift = static_cast<T>(0.5 * scale) * norm2 + log_sqrt_r;
          for (int64_t f = 0; f < r; ++f) phi[f] = std::exp(phi[f] - shift);
        }
      }
      std::fill(stats.begin(), stats.end(), T(0));
      const T* s = state_p + h * r * (Dv + 1);
      for (int64_t f = 0; f < r; ++f) {
        const T p = phi[f];
        const T* s_row = s + f * (Dv + 1);
        for (int64_t j = 0; j <= Dv; ++j) stats[j] += p * s_row[j];
      }
      const T weight = std::exp(std::min(-lse_a[b][kv][g], static_cast<T>(cap)));
      const T inv_den = T(1) / (T(1) + weight * std::max(stats[Dv], T(0)));
      T* o_row = out_p + row * Dv;
      for (int64_t j = 0; j < Dv; ++j) o_row[j] = (o_a[b][kv][g][j] + weight * stats[j]) * inv_den;
    }
  });
}

}  // namespace

// q [B, H, 1, D], k [B, H_kv, S, D], v [B, H_kv, S, D] (one head dim), state [H, r, D + 1] in the compute
// dtype (float32 or float64); phi [B, H, r] in that dtype, or projection [D, r] (random features).
at::Tensor decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& state,
                       const c10::optional<at::Tensor>& phi, const c10::optional<at::Tensor>& projection,
                       bool normalize, double scale, double cap) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_step: q must be [B, H, 1, D]");
  TORCH_CHECK(phi.has_value() != projection.has_value(), "decode_step: give phi or projection, not both");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), H_kv = k.size(1), Dv = v.size(3);
  TORCH_CHECK(state.is_contiguous() && state.size(0) == H && state.size(2) == Dv + 1, "decode_step: state must be [H, r, D_v + 1]");
  const int64_t r = state.size(1);
  TORCH_CHECK(k.size(3) == D && Dv == D && H % H_kv == 0, "decode_step: q, k, v must share one head dim, and H_kv divide H");
  TORCH_CHECK(!projection || (projection->is_contiguous() && projection->size(0) == D && projection->size(1) == r &&
                              projection->scalar_type() == state.scalar_type()),
              "decode_step: projection must be a contiguous [D, r] in the state's dtype, r = ", r);
  TORCH_CHECK(!phi || (phi->is_contiguous() && phi->numel() == B * H * r && phi->scalar_type() == state.scalar_type()),
              "decode_step: phi must be a contiguous [B, H, r] in the state's dtype, r = ", r);
  const auto dtype = state.scalar_type();
  // Every call here goes through the dispatcher, at every layer and token: convert only what differs.
  const auto as_compute = [dtype](const at::Tensor& t) { return t.scalar_type() == dtype ? t : t.to(dtype); };
  auto res = at::_scaled_dot_product_flash_attention_for_cpu(q.reshape({B, H_kv, H / H_kv, D}), k, v, 0.0, false,
                                                             c10::nullopt, scale);
  const auto o = as_compute(std::get<0>(res)), lse = as_compute(std::get<1>(res)), q_c = as_compute(q);
  auto out = at::empty({B, H, 1, Dv}, q_c.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "ntk_decode_step", [&] {
    merge_rows<scalar_t>(q_c, o, lse, state, phi, projection, normalize, scale, cap, out);
  });
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &decode_step, "NTK-Attention generation step on CPU (torch_decode.py's formula)");
}
