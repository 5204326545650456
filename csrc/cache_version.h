// The "version" under which a cache of plans built from a tensor's values keys that tensor.
//
// Ordinary tensors count their in-place edits (_version()), so identity + version names their
// values. Inference tensors (made under torch.inference_mode) have no version counter, and
// _version() throws for them; their key is a hash of their values instead (copied to the host
// first where they live on a device: the plan tables are small; orbit ids are validated on the host
// anyway). The hash has its top bit set, so it never equals a version count.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace equikern {

inline int64_t cache_version(const at::Tensor& t) {
  if (!t.is_inference()) return static_cast<int64_t>(t._version());
  const auto host = t.to(at::kCPU).contiguous();
  const auto* bytes = static_cast<const unsigned char*>(host.data_ptr());
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (size_t i = 0, n = host.nbytes(); i < n; ++i) {
    h ^= bytes[i];
    h *= 1099511628211ull;
  }
  return static_cast<int64_t>(h | (1ull << 63));
}

}  // namespace equikern
