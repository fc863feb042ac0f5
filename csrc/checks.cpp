#include "gmvq/checks.h"


#include <cmath>

namespace gmvq {

void check_matrix(const at::Tensor& t, const char* name, const char* shape_doc) {
  TORCH_CHECK(t.dim() == 2, name, " must be a 2-D tensor ", shape_doc, ", got ", t.dim(), "-D");
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble,
              name, " must be float16, bfloat16, float32 or float64, got ", type);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                bool same_dtype) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
              ref.device(), "), got ", t.device());
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ",
                ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  }
}

void check_codebook_inputs(const at::Tensor& z, const std::optional<at::Tensor>& weight,
                           const at::Tensor& codebook) {
  check_matrix(z, "z", "(N, D)");
  check_matrix(codebook, "codebook", "(K, D)");
  check_like(codebook, "codebook", z, "z", /*same_dtype=*/true);
  TORCH_CHECK(codebook.size(0) >= 1, "codebook must have at least one code (K >= 1), got K = 0");
  TORCH_CHECK(codebook.size(1) == z.size(1), "codebook must have D = ", z.size(1),
              " columns like z, got ", codebook.size(1));
  TORCH_CHECK(z.size(1) >= 1, "z must have at least one column (D >= 1), got D = 0");
  if (weight.has_value()) {
    const auto& w = *weight;
    check_matrix(w, "weight", "(N, D) or (N, 1)");
    check_like(w, "weight", z, "z", /*same_dtype=*/true);
    TORCH_CHECK(w.size(0) == z.size(0) && (w.size(1) == z.size(1) || w.size(1) == 1),
                "weight must have shape (N, D) = (", z.size(0), ", ", z.size(1), ") or (N, 1), got ",
                w.sizes());
  }
}

void check_logits(const at::Tensor& logits, const char* name) {
  check_matrix(logits, name, "(N, K)");
  TORCH_CHECK(logits.size(1) >= 1, name, " must have at least one column (K >= 1), got K = 0");
}

void check_positive_finite(double value, const char* name) {
  TORCH_CHECK(std::isfinite(value) && value > 0, name, " must be finite and > 0, got ", value);
}

void check_noise(const std::optional<at::Tensor>& noise, const char* name, int64_t rows,
                 int64_t cols, const at::Tensor& ref) {
  if (!noise.has_value()) return;
  const auto& t = *noise;
  check_matrix(t, name, "(N, cols)");
  check_like(t, name, ref, "the input", /*same_dtype=*/false);
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ", cols,
              "), got ", t.sizes());
}

void check_grad(const at::Tensor& grad, const char* name, at::IntArrayRef shape,
                const at::Tensor& ref) {
  TORCH_CHECK(grad.sizes() == shape, name, " must have shape ", shape, ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == ref.device(), name, " must be on ", ref.device(), ", got ",
              grad.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), name, " must be floating point, got ",
              grad.scalar_type());
}

}  // namespace gmvq
