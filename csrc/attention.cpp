// Host entry points of fused scaled-dot-product attention (attention_params.h): check the
// arguments with the messages of dlcv_fast/ops/attention.py, describe the tensors by their
// strides (the mask broadcast by stride 0, never expanded in memory), then run the CPU or
// CUDA kernel.

#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>
#include <string>

#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"

#ifdef DLCV_FAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace dlcv_fast {
namespace {

constexpr const char* kOp = "scaled_dot_product_attention";
constexpr int64_t kMaxHeadDim = 256;

struct Problem {
  AttentionParams p;
  at::Tensor q, k, v, mask;  // last dimension dense; 16-bit CPU inputs in float32
  at::ScalarType compute;     // the kernels' element type
  at::ScalarType stats;       // lse and delta: float64 for float64, else float32
};

// dtypes as Python prints them, so that both paths raise the same message.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

void check_4d(const char* name, const at::Tensor& t, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == 4, kOp, ": ", name, " must be 4-D ", dims, ", but got shape ",
                    t.sizes());
}

at::Tensor last_dim_dense(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous();
}

Problem prepare(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                double scale, int64_t seed) {
  check_floating(kOp, "query", query);
  check_same_device(kOp, "key", key, "query", query);
  check_same_device(kOp, "value", value, "query", query);
  TORCH_CHECK_TYPE(key.scalar_type() == query.scalar_type(), kOp, ": key has dtype ",
                   dtype_name(key.scalar_type()), " but query has ",
                   dtype_name(query.scalar_type()));
  TORCH_CHECK_TYPE(value.scalar_type() == query.scalar_type(), kOp, ": value has dtype ",
                   dtype_name(value.scalar_type()), " but query has ",
                   dtype_name(query.scalar_type()));
  check_4d("query", query, "(batch, heads, L, E)");
  check_4d("key", key, "(batch, kv_heads, S, E)");
  check_4d("value", value, "(batch, kv_heads, S, Ev)");
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2), Dv = value.size(3);
  TORCH_CHECK_VALUE(key.size(0) == B && value.size(0) == B, kOp,
                    ": query, key and value must have the same batch size, but got ", B, ", ",
                    key.size(0), " and ", value.size(0));
  TORCH_CHECK_VALUE(value.size(1) == Hkv, kOp, ": key and value must have the same number of "
                    "heads, but got ", Hkv, " and ", value.size(1));
  TORCH_CHECK_VALUE(Hkv > 0 && H % Hkv == 0, kOp, ": query's heads (", H,
                    ") must be a multiple of key's and value's heads (", Hkv, ")");
  TORCH_CHECK_VALUE(value.size(2) == S, kOp, ": key and value must have the same length S, but "
                    "got ", S, " and ", value.size(2));
  TORCH_CHECK_VALUE(key.size(3) == D, kOp, ": key's head dim (", key.size(3),
                    ") must equal query's (", D, ")");
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim && Dv >= 1 && Dv <= kMaxHeadDim, kOp,
                    ": head dims must lie in [1, ", kMaxHeadDim, "], but got E=", D, " and Ev=",
                    Dv);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, kOp, ": dropout_p must lie in [0, 1), but "
                    "got ", dropout_p);
  TORCH_CHECK_VALUE(std::isfinite(scale), kOp, ": scale must be finite, but got ", scale);

  Problem pr;
  AttentionParams& p = pr.p;
  p = AttentionParams{};
  p.batch = B, p.heads = H, p.kv_heads = Hkv, p.q_len = L, p.kv_len = S;
  p.head_dim = D, p.v_dim = Dv;
  p.causal = is_causal;
  p.scale = scale;
  p.dropout_p = dropout_p;
  // Half to even, as Python's round() in dropout_keep_mask and the Triton launcher.
  p.dropout_threshold = static_cast<uint32_t>(std::nearbyint(dropout_p * 16777216.0));
  p.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed));

  const bool cpu_16bit = cpu_kernels(query) && (query.scalar_type() == at::kHalf ||
                                            query.scalar_type() == at::kBFloat16);
  pr.compute = cpu_16bit ? at::kFloat : query.scalar_type();
  pr.stats = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  pr.q = last_dim_dense(query).to(pr.compute);
  pr.k = last_dim_dense(key).to(pr.compute);
  pr.v = last_dim_dense(value).to(pr.compute);
  for (int a = 0; a < 3; ++a) {
    p.q_stride[a] = pr.q.stride(a);
    p.k_stride[a] = pr.k.stride(a);
    p.v_stride[a] = pr.v.stride(a);
  }

  p.mask_kind = MaskKind::None;
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    check_same_device(kOp, "attn_mask", m, "query", query);
    // PyTorch's rule: a float32 mask goes with any query dtype (converted to pr.compute below).
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat ||
                         m.scalar_type() == query.scalar_type(),
                     kOp, ": attn_mask must be bool, float32 or query's dtype ",
                     dtype_name(query.scalar_type()), ", but got ", dtype_name(m.scalar_type()));
    const int64_t target[4] = {B, H, L, S};
    bool ok = m.dim() <= 4;
    for (int64_t a = 0; ok && a < m.dim(); ++a) {
      const int64_t size = m.size(m.dim() - 1 - a);
      ok = size == 1 || size == target[3 - a];
    }
    TORCH_CHECK_VALUE(ok, kOp, ": attn_mask of shape ", m.sizes(),
                      " cannot be broadcast to (batch, heads, L, S) = (", B, ", ", H, ", ", L,
                      ", ", S, ")");
    // A view: broadcast dimensions get stride 0.
    pr.mask = m.scalar_type() == at::kBool ? m : m.to(pr.compute);
    pr.mask = pr.mask.expand({B, H, L, S});
    p.mask_kind = m.scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Additive;
    for (int a = 0; a < 4; ++a) p.mask_stride[a] = pr.mask.stride(a);
  }
  return pr;
}

at::Tensor new_tensor(at::IntArrayRef shape, at::ScalarType type, const at::Tensor& like) {
  at::Tensor t = at::empty(shape, like.options().dtype(type));
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

const void* mask_ptr(const Problem& pr) {
  return pr.mask.defined() ? pr.mask.const_data_ptr() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sdpa(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value,
                                        const std::optional<at::Tensor>& attn_mask,
                                        double dropout_p, bool is_causal, double scale,
                                        int64_t seed) {
  Problem pr = prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, seed);
  AttentionParams& p = pr.p;
  at::Tensor out = new_tensor({p.batch, p.heads, p.q_len, p.v_dim}, pr.compute, query);
  at::Tensor lse = new_tensor({p.batch, p.heads, p.q_len}, pr.stats, query);
  for (int a = 0; a < 3; ++a) p.o_stride[a] = out.stride(a);
  if (out.numel() > 0) {
    const DType dtype = kernel_dtype(pr.compute);
    if (cpu_kernels(query)) {
      cpu::attention_forward(dtype, p, pr.q.const_data_ptr(), pr.k.const_data_ptr(),
                             pr.v.const_data_ptr(), mask_ptr(pr), out.mutable_data_ptr(),
                             lse.mutable_data_ptr());
    } else {
#ifdef DLCV_FAST_WITH_CUDA
      launch_cuda(kOp, query, [&](cudaStream_t stream) {
        return cuda::attention_forward(dtype, p, pr.q.const_data_ptr(), pr.k.const_data_ptr(),
                                       pr.v.const_data_ptr(), mask_ptr(pr),
                                       out.mutable_data_ptr(), lse.mutable_data_ptr(), stream);
      });
#else
      no_cuda_kernels(kOp, query);
#endif
    }
  }
  return {out.to(query.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    int64_t seed) {
  const char* op = "scaled_dot_product_attention_backward";
  Problem pr = prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, seed);
  AttentionParams& p = pr.p;
  const std::vector<int64_t> out_shape{p.batch, p.heads, p.q_len, p.v_dim};
  const std::vector<int64_t> lse_shape{p.batch, p.heads, p.q_len};
  const auto check_like_out = [&](const char* name, const at::Tensor& t) {
    check_same_device(op, name, t, "query", query);
    TORCH_CHECK_TYPE(t.scalar_type() == query.scalar_type(), op, ": ", name, " has dtype ",
                     dtype_name(t.scalar_type()), " but query has ",
                     dtype_name(query.scalar_type()));
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(out_shape), op, ": ", name,
                      " must have shape ", at::IntArrayRef(out_shape), ", but got ", t.sizes());
  };
  check_like_out("grad_out", grad_out);
  check_like_out("out", out);
  check_same_device(op, "lse", lse, "query", query);
  TORCH_CHECK_TYPE(lse.scalar_type() == pr.stats, op, ": lse must be ", dtype_name(pr.stats),
                   ", but got ", dtype_name(lse.scalar_type()));
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), op, ": lse must have shape ",
                    at::IntArrayRef(lse_shape), ", but got ", lse.sizes());

  const at::Tensor g = grad_out.to(pr.compute).contiguous();
  const at::Tensor o = out.to(pr.compute).contiguous();
  const at::Tensor ls = lse.contiguous();
  for (int a = 0; a < 3; ++a) {
    p.o_stride[a] = o.stride(a);
    p.do_stride[a] = g.stride(a);
  }
  at::Tensor dq = new_tensor({p.batch, p.heads, p.q_len, p.head_dim}, pr.compute, query);
  at::Tensor dk = new_tensor({p.batch, p.kv_heads, p.kv_len, p.head_dim}, pr.compute, query);
  at::Tensor dv = new_tensor({p.batch, p.kv_heads, p.kv_len, p.v_dim}, pr.compute, query);
  at::Tensor delta = at::empty(lse_shape, lse.options());
  if (dq.numel() > 0 || dk.numel() > 0) {
    const DType dtype = kernel_dtype(pr.compute);
    if (cpu_kernels(query)) {
      cpu::attention_backward(dtype, p, g.const_data_ptr(), pr.q.const_data_ptr(),
                              pr.k.const_data_ptr(), pr.v.const_data_ptr(), o.const_data_ptr(),
                              ls.const_data_ptr(), mask_ptr(pr), delta.mutable_data_ptr(),
                              dq.mutable_data_ptr(), dk.mutable_data_ptr(),
                              dv.mutable_data_ptr());
    } else {
#ifdef DLCV_FAST_WITH_CUDA
      launch_cuda(op, query, [&](cudaStream_t stream) {
        return cuda::attention_backward(dtype, p, g.const_data_ptr(), pr.q.const_data_ptr(),
                                        pr.k.const_data_ptr(), pr.v.const_data_ptr(),
                                        o.const_data_ptr(), ls.const_data_ptr(), mask_ptr(pr),
                                        delta.mutable_data_ptr(), dq.mutable_data_ptr(),
                                        dk.mutable_data_ptr(), dv.mutable_data_ptr(), stream);
      });
#else
      no_cuda_kernels(op, query);
#endif
    }
  }
  const auto type = query.scalar_type();
  return {dq.to(type), dk.to(type), dv.to(type)};
}

}  // namespace dlcv_fast
