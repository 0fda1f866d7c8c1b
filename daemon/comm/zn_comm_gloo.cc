/* The Gloo backend: a thin C++ wrapper that gives zn_comm.c a C table of operations over Gloo's
 * TCP transport. The only C++ in the daemon, and only as much as Gloo's API needs.
 *
 * Peers meet through a gloo::rendezvous::Store built on the caller's zn_kv callbacks: each rank
 * publishes its listening address under "<prefix>/<rank>" and connects a full mesh. Every Gloo
 * exception is caught here and becomes ZN_ERR_COMM with its message; none crosses into C.
 *
 * The sums use Gloo's ring algorithm: each segment of the buffer is reduced on one rank in a fixed
 * order and then copied to all others, so every rank ends with the same bits, and the same inputs
 * give the same bits on every run.
 *
 * The reduce-scatter is a ring over Gloo's point-to-point buffers; see reduce_scatter() below
 * for why it is not Gloo's own. Its sums have a fixed order too: block b is added up from rank
 * b + 1 around the ring to rank b itself, so on two ranks it has the ring allreduce's bits
 * (a + b == b + a). */
#include "zn_comm_backend.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

using Millis = std::chrono::milliseconds;

// Gloo's rendezvous keys are bare ranks ("0", "1", ...); the prefix keeps runs that share one
// store apart. A store error is thrown as a Gloo IoException so that it leaves connectFullMesh
// the same way a transport error does.
class KvStore : public gloo::rendezvous::Store {
 public:
  KvStore(const zn_kv& kv, std::string prefix, Millis timeout)
      : kv_(kv), prefix_(std::move(prefix)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    std::string full = prefix_ + "/" + key;
    int rc = kv_.set(kv_.ctx, full.c_str(), data.data(), data.size());
    if (rc != ZN_OK) fail("set", full, rc);
  }

  std::vector<char> get(const std::string& key) override {
    wait({key}, timeout_);
    std::string full = prefix_ + "/" + key;
    void* value = nullptr;
    size_t len = 0;
    int rc = kv_.get(kv_.ctx, full.c_str(), &value, &len);
    if (rc != ZN_OK) fail("get", full, rc);
    std::unique_ptr<char, decltype(&free)> owned(static_cast<char*>(value), &free);
    return std::vector<char>(owned.get(), owned.get() + len);
  }

  void wait(const std::vector<std::string>& keys) override {
    wait(keys, timeout_);
  }

  void wait(const std::vector<std::string>& keys, const Millis& timeout) override {
    std::vector<std::string> full;
    std::vector<const char*> ptrs;
    full.reserve(keys.size());
    for (const auto& k : keys) full.push_back(prefix_ + "/" + k);
    for (const auto& k : full) ptrs.push_back(k.c_str());
    int rc = kv_.wait(kv_.ctx, ptrs.data(), static_cast<int>(ptrs.size()),
                      static_cast<int>(timeout.count()));
    if (rc == ZN_ERR_TIMEOUT) {
      throw gloo::IoException("no peer published " + full.front() + " within " +
                              std::to_string(timeout.count()) + " ms");
    }
    if (rc != ZN_OK) fail("wait", full.front(), rc);
  }

 private:
  [[noreturn]] static void fail(const char* op, const std::string& key, int rc) {
    throw gloo::IoException(std::string("rendezvous ") + op + " of " + key +
                            " failed with zn_err " + std::to_string(rc));
  }

  zn_kv kv_;
  std::string prefix_;
  Millis timeout_;
};

// Gloo's own collectives use slot prefixes 0x01 to 0x08 (gloo/types.h).
constexpr uint8_t kReduceScatterSlotPrefix = 0x20;

struct GlooComm {
  std::shared_ptr<gloo::rendezvous::Context> context;
  // Every collective gets its own tag so that a message left over from an aborted one can never
  // be matched by the next. All ranks issue the same sequence, so their tags agree.
  uint32_t tag = 0;
  // The reduce-scatter's receive buffer: one block, kept between calls.
  std::vector<float> incoming;
};

void copy_err(const char* what, char* err, size_t errlen) {
  if (err && errlen > 0) snprintf(err, errlen, "%s", what);
}

// Runs fn and turns any exception into ZN_ERR_COMM with its text.
template <typename Fn>
int guarded(Fn fn, char* err, size_t errlen) {
  try {
    fn();
    return ZN_OK;
  } catch (const std::bad_alloc&) {
    copy_err("out of memory", err, errlen);
    return ZN_ERR_NOMEM;
  } catch (const std::exception& e) {
    copy_err(e.what(), err, errlen);
    return ZN_ERR_COMM;
  } catch (...) {
    copy_err("unknown exception from gloo", err, errlen);
    return ZN_ERR_COMM;
  }
}

template <typename T>
void ring_sum(GlooComm* g, T* buf, size_t n) {
  gloo::AllreduceOptions opts(g->context);
  opts.setAlgorithm(gloo::AllreduceOptions::Algorithm::RING);
  opts.setOutput(buf, n);
  void (*sum)(void*, const void*, const void*, size_t) = &gloo::sum<T>;
  opts.setReduceFunction(sum);
  opts.setTag(g->tag++);
  gloo::allreduce(opts);
}

int gloo_allreduce_sum(void* impl, void* buf, size_t n, zn_comm_dtype dtype, char* err,
                       size_t errlen) {
  auto* g = static_cast<GlooComm*>(impl);
  return guarded(
      [&] {
        if (dtype == ZN_COMM_F32) {
          ring_sum(g, static_cast<float*>(buf), n);
        } else {
          ring_sum(g, static_cast<double*>(buf), n);
        }
      },
      err, errlen);
}

void barrier(GlooComm* g) {
  gloo::BarrierOptions opts(g->context);
  opts.setTag(g->tag++);
  gloo::barrier(opts);
}

// Fails the collective the way Gloo's own do, so that guarded() reports it.
void wait_or_throw(bool done, const char* what) {
  if (!done) throw gloo::IoException(std::string("reduce-scatter ") + what + " was aborted");
}

// A ring reduce-scatter on Gloo's point-to-point buffers. Gloo's own (the old-style
// ReduceScatterHalvingDoubling of the packaged version) keeps two scratch buffers the size of the
// whole vector, which would cost more memory than sharding saves, and needs workarounds to be
// safe to reuse: its sends may still read a region its distribution phase overwrites. A ring
// needs one block of scratch and nothing around it.
//
// In step s (0 <= s < size - 1) rank r sends its partial sum of block r - s - 1 to rank r + 1 and
// adds what rank r - 1 sends, its partial of block r - s - 2, to its own. Block b starts at rank
// b + 1 and is complete when it reaches rank b, after size - 1 steps. A block is never written
// while it is being sent (it is sent the step after it was written), and every send has finished
// before the call returns, so the caller may reuse the buffer at once.
void reduce_scatter(GlooComm* g, float* buf, size_t count) {
  const int size = g->context->size;
  const int rank = g->context->rank;
  const auto timeout = g->context->getTimeout();
  const size_t block_bytes = count * sizeof(float);
  g->incoming.resize(count);
  auto whole = g->context->createUnboundBuffer(buf, block_bytes * size);
  auto incoming = g->context->createUnboundBuffer(g->incoming.data(), block_bytes);
  const int right = (rank + 1) % size, left = (rank + size - 1) % size;
  const auto slot = gloo::Slot::build(kReduceScatterSlotPrefix, g->tag++);
  for (int s = 0; s < size - 1; s++) {
    const size_t send_block = static_cast<size_t>((rank - s - 1 + 2 * size) % size);
    const size_t add_block = static_cast<size_t>((rank - s - 2 + 2 * size) % size);
    whole->send(right, slot + static_cast<uint8_t>(s), send_block * block_bytes, block_bytes);
    incoming->recv(left, slot + static_cast<uint8_t>(s), 0, block_bytes);
    wait_or_throw(incoming->waitRecv(timeout), "receive");
    float* mine = buf + add_block * count;
    const float* theirs = g->incoming.data();
    for (size_t i = 0; i < count; i++) mine[i] = theirs[i] + mine[i];
    wait_or_throw(whole->waitSend(timeout), "send");
  }
}

int gloo_reduce_scatter_sum(void* impl, float* buf, size_t count, char* err, size_t errlen) {
  auto* g = static_cast<GlooComm*>(impl);
  return guarded([&] { reduce_scatter(g, buf, count); }, err, errlen);
}

int gloo_allgather(void* impl, void* buf, size_t bytes, char* err, size_t errlen) {
  auto* g = static_cast<GlooComm*>(impl);
  return guarded(
      [&] {
        // Only an output: Gloo then takes this rank's block of it as the input, in place.
        gloo::AllgatherOptions opts(g->context);
        opts.setOutput(static_cast<uint8_t*>(buf), bytes * g->context->size);
        opts.setTag(g->tag++);
        gloo::allgather(opts);
      },
      err, errlen);
}

int gloo_broadcast(void* impl, void* buf, size_t bytes, int root, char* err, size_t errlen) {
  auto* g = static_cast<GlooComm*>(impl);
  return guarded(
      [&] {
        gloo::BroadcastOptions opts(g->context);
        opts.setOutput(static_cast<uint8_t*>(buf), bytes);
        opts.setRoot(root);
        opts.setTag(g->tag++);
        gloo::broadcast(opts);
      },
      err, errlen);
}

int gloo_barrier(void* impl, char* err, size_t errlen) {
  auto* g = static_cast<GlooComm*>(impl);
  return guarded([&] { barrier(g); }, err, errlen);
}

void gloo_destroy(void* impl) {
  delete static_cast<GlooComm*>(impl);
}

int gloo_connect(const zn_comm_config* cfg, const zn_kv* kv, void* /*arg*/, void** impl, char* err,
                 size_t errlen) {
  *impl = nullptr;
  GlooComm* g = nullptr;
  int rc = guarded(
      [&] {
        auto holder = std::make_unique<GlooComm>();
        Millis timeout(cfg->timeout_ms);
        gloo::transport::tcp::attr attr;
        attr.hostname = cfg->host;
        auto device = gloo::transport::tcp::CreateDevice(attr);

        auto context = std::make_shared<gloo::rendezvous::Context>(cfg->rank, cfg->size);
        context->setTimeout(timeout);
        KvStore store(*kv, cfg->prefix, timeout);
        context->connectFullMesh(store, device);
        holder->context = std::move(context);
        g = holder.release();
      },
      err, errlen);
  if (rc == ZN_OK) *impl = g;
  return rc;
}

const zn_comm_ops gloo_ops = {
    "gloo",  gloo_allreduce_sum,      gloo_broadcast, gloo_barrier, gloo_destroy, nullptr,
    nullptr, gloo_reduce_scatter_sum, gloo_allgather,
};

}  // namespace

extern "C" int zn_comm_create_gloo(const zn_comm_config* cfg, const zn_kv* kv, zn_comm** out,
                                   char* err, size_t errlen) {
  return zn_comm_create_with(cfg, kv, &gloo_ops, gloo_connect, nullptr, out, err, errlen);
}
