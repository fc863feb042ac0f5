// The quantize backward's launches (quantize.cu calls them): the per-row
// gradients of quantize_rows.cuh and the codebook sweeps of
// quantize_backward.cuh, for float and double. A translation unit of their
// own, so that they compile in parallel with the forward's.
#include "quantize_backward.cuh"
#include "quantize_rows.cuh"

namespace gmvq::cuda::fused {

template <typename T>
void launch_backward_prepare(const RowArgs<T>& args) {
  launch(backward_prepare_kernel<T>, dim3(ceil_div(args.n, kRowsPerBlock)), kRowsPerBlock * 32, 0, args,
         "the per-row gradients");
}

template <typename T>
void launch_backward_rows(Tiles tiles, const SweepArgs<T>& args, bool full_weight) {
  const BackwardRowsSmem<T> smem(args.rp, args.dp);
  dispatch_tiles<T>(tiles, [&](auto math) {
    dispatch_bool(full_weight, [&](auto full_c) {
      launch(backward_rows_kernel<T, decltype(math), decltype(full_c)::value>,
             dim3(ceil_div(args.n, kBackwardRows)), kBlockThreads, smem.bytes, args,
             "the backward row sweep at this D");
    });
  });
}

template <typename T>
void launch_backward_columns(Tiles tiles, const SweepArgs<T>& args, int64_t segments, bool full_weight) {
  const BackwardColumnsSmem<T> smem(args.rp, args.dp);
  dispatch_tiles<T>(tiles, [&](auto math) {
    dispatch_bool(full_weight, [&](auto full_c) {
      launch(backward_columns_kernel<T, decltype(math), decltype(full_c)::value>,
             dim3(ceil_div(args.k, kCodeTile), segments), kBlockThreads, smem.bytes, args,
             "the codebook-gradient sweep at this D");
    });
  });
}

template void launch_backward_prepare<float>(const RowArgs<float>&);
template void launch_backward_prepare<double>(const RowArgs<double>&);
template void launch_backward_rows<float>(Tiles, const SweepArgs<float>&, bool);
template void launch_backward_rows<double>(Tiles, const SweepArgs<double>&, bool);
template void launch_backward_columns<float>(Tiles, const SweepArgs<float>&, int64_t, bool);
template void launch_backward_columns<double>(Tiles, const SweepArgs<double>&, int64_t, bool);

}  // namespace gmvq::cuda::fused
