// The quantize forward's launches (quantize.cu calls them): the codebook
// sweeps of quantize_forward.cuh and the per-row finish of quantize_rows.cuh,
// for float and double. A translation unit of their own, so that they compile
// in parallel with the backward's.
#include "quantize_forward.cuh"
#include "quantize_rows.cuh"

namespace gmvq::cuda::fused {

template <typename T>
void launch_forward_rows(Tiles tiles, const SweepArgs<T>& args, bool soft) {
  const ForwardRowsSmem<T> smem(args.rp, soft);
  dispatch_tiles<T>(tiles, [&](auto math) {
    dispatch_bool(soft, [&](auto soft_c) {
      launch(forward_rows_kernel<T, decltype(math), decltype(soft_c)::value>, dim3(ceil_div(args.n, kForwardRows)),
             kBlockThreads, smem.bytes, args, "the forward row sweep at this D");
    });
  });
}

template <typename T>
void launch_forward_columns(Tiles tiles, const SweepArgs<T>& args, int64_t segments) {
  const ForwardColumnsSmem<T> smem(args.rp);
  dispatch_tiles<T>(tiles, [&](auto math) {
    launch(forward_columns_kernel<T, decltype(math)>, dim3(ceil_div(args.k, kCodeTile), segments), kBlockThreads,
           smem.bytes, args, "the q_bar sweep at this D");
  });
}

template <typename T>
void launch_forward_finish(const RowArgs<T>& args) {
  launch(forward_finish_kernel<T>, dim3(ceil_div(args.n, kRowsPerBlock)), kRowsPerBlock * 32, 0, args,
         "the per-row finish");
}

template void launch_forward_rows<float>(Tiles, const SweepArgs<float>&, bool);
template void launch_forward_rows<double>(Tiles, const SweepArgs<double>&, bool);
template void launch_forward_columns<float>(Tiles, const SweepArgs<float>&, int64_t);
template void launch_forward_columns<double>(Tiles, const SweepArgs<double>&, int64_t);
template void launch_forward_finish<float>(const RowArgs<float>&);
template void launch_forward_finish<double>(const RowArgs<double>&);

}  // namespace gmvq::cuda::fused
