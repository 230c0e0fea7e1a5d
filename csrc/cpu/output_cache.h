// output_cache.h: where the CPU kernels' large results (>= 1 MiB) come from.
//
// glibc gives a freed multi-MiB block back to the OS (munmap, or a trim of the
// heap top) as soon as it is free, so the next step's result of the same size
// arrives as fresh pages and the kernel writing it takes one page fault per
// 4 KiB: 3136 faults, about 3.8 ms, for the 12 MiB drecon of a 4096 x 784
// step here (getrusage), more than the whole fused step. A freed block is
// kept here instead and handed out again for the next request of the same
// size, already mapped: a small size-keyed cache, like PyTorch's CUDA caching
// allocator. It holds at most kMaxBlocks idle blocks and FASTELBO_CPU_CACHE_MB
// (default 256) MiB; 0 turns it off. Blocks are reported to the profiler like
// the default CPU allocator's, so memory figures see every result.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <deque>
#include <mutex>

namespace fastelbo {
namespace cpu {

class OutputCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;
  static constexpr size_t kMaxBlocks = 16;

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: results may outlive static teardown
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = round_up(n);
    void* p = take(bytes);
    if (!p) p = c10::alloc_cpu(bytes);
    auto* block = new Block{p, bytes};
    c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(bytes), 0, 0, c10::Device(c10::DeviceType::CPU));
    return {p, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  OutputCache() {
    size_t mb = 256;
    if (const char* text = std::getenv("FASTELBO_CPU_CACHE_MB")) {
      char* end = nullptr;
      const unsigned long long value = std::strtoull(text, &end, 10);
      if (end != text && *end == '\0' && text[0] != '-')
        mb = static_cast<size_t>(value);
      else
        TORCH_WARN("fastelbo: FASTELBO_CPU_CACHE_MB must be a whole number of MiB (0 turns the cache off), got '",
                   text, "'; using ", mb);
    }
    capacity_ = mb << 20;
  }

  static size_t round_up(size_t n) { return (n + 4095) & ~size_t(4095); }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {  // most recently freed first: warmest
      if (it->bytes == bytes) {
        void* p = it->ptr;
        idle_.erase(std::next(it).base());
        idle_bytes_ -= bytes;
        return p;
      }
    }
    return nullptr;
  }

  // Keeps the block unless that passes the limits; the oldest idle blocks make room.
  void give_back(Block block) {
    std::deque<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block.bytes > capacity_) {
        drop.push_back(block);
      } else {
        idle_.push_back(block);
        idle_bytes_ += block.bytes;
        while (idle_bytes_ > capacity_ || idle_.size() > kMaxBlocks) {
          idle_bytes_ -= idle_.front().bytes;
          drop.push_back(idle_.front());
          idle_.pop_front();
        }
      }
    }
    for (const Block& b : drop) c10::free_cpu(b.ptr);
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    c10::reportMemoryUsageToProfiler(block->ptr, -static_cast<int64_t>(block->bytes), 0, 0,
                                     c10::Device(c10::DeviceType::CPU));
    get().give_back(*block);
    delete block;
  }

  std::mutex mutex_;
  std::deque<Block> idle_;
  size_t idle_bytes_ = 0;
  size_t capacity_ = 0;
};

// A contiguous result tensor like `options` of `sizes`; from the cache when it is large.
inline at::Tensor empty_result(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < OutputCache::kMinBytes || options.device().type() != c10::DeviceType::CPU)
    return at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), at::MemoryFormat::Contiguous);
}

}  // namespace cpu
}  // namespace fastelbo
