// Shared by the expert kernels of cpu_gemv.cpp, cpu_int.cpp and cpu_fp8.cpp (each built as its own extension;
// the JIT build's ninja tracks this header, so editing it rebuilds them).
#pragma once
#include <torch/extension.h>
#include <vector>

// (expert, first row, count) for each run of equal ids; ids [P] int64, sorted ascending, each in [0, E)
inline std::vector<int64_t> expert_runs(const torch::Tensor& ids, int64_t E) {
  auto ic = ids.contiguous();
  const int64_t P = ic.size(0);
  const int64_t* ip = ic.data_ptr<int64_t>();
  std::vector<int64_t> runs;
  for (int64_t p = 0; p < P;) {
    int64_t q = p;
    while (q < P && ip[q] == ip[p]) ++q;
    TORCH_CHECK(ip[p] >= 0 && ip[p] < E, "expert id ", ip[p], " out of range [0, ", E, ")");
    TORCH_CHECK(q == P || ip[q] > ip[p], "expert ids must be sorted ascending (", ip[q], " after ", ip[p], ")");
    runs.insert(runs.end(), {ip[p], p, q - p});
    p = q;
  }
  return runs;
}
