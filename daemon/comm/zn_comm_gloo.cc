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
 * The reduce-scatter is Gloo's halving-doubling one, an old-style algorithm: see reduce_scatter()
 * below for what it needs around it. Its sums also have a fixed order: (x0 + x1) + x2 for three
 * ranks, (x0 + x1) + (x2 + x3) for four, x0 + x1 for two (the same bits as the ring allreduce,
 * since a + b == b + a). */
#include "zn_comm_backend.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/reduce_scatter.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// A send buffer of Gloo's old-style API whose send() returns only once the transport has written
// all of it. Gloo's TCP pair writes what the socket takes at once and leaves the rest to its event
// loop, which reads the caller's memory later; meanwhile ReduceScatterHalvingDoubling::run() goes
// on and, in its distribution phase, copies each rank's result to the start of the buffer, over
// data that a peer may still be receiving from it. The peer then adds the wrong numbers (seen on
// two ranks with 4 million floats a block: the tail of rank 0's block was wrong). The receivers
// read from their sockets on their own event-loop threads, so waiting here cannot deadlock.
class WrittenSend : public gloo::transport::Buffer {
 public:
  explicit WrittenSend(std::unique_ptr<gloo::transport::Buffer> inner)
      : gloo::transport::Buffer(-1, nullptr, 0), inner_(std::move(inner)) {}

  using gloo::transport::Buffer::send;

  void send(size_t offset, size_t length, size_t roffset) override {
    inner_->send(offset, length, roffset);
    inner_->waitSend();
  }

  void waitRecv() override {
    inner_->waitRecv();
  }

  // send() has already waited.
  void waitSend() override {}

 private:
  std::unique_ptr<gloo::transport::Buffer> inner_;
};

// Gloo's halving-doubling reduce-scatter with every data send replaced by a WrittenSend; the
// algorithm itself is Gloo's, unchanged.
class ReduceScatter : public gloo::ReduceScatterHalvingDoubling<float> {
 public:
  ReduceScatter(const std::shared_ptr<gloo::Context>& context, float* buf, int count,
                const std::vector<int>& per_rank)
      : gloo::ReduceScatterHalvingDoubling<float>(context, {buf}, count, per_rank) {
    for (auto* sends : {&sendDataBufs_, &largerBlockSendDataBufs_, &distSendDataBufs_}) {
      for (auto& b : *sends) b = std::make_unique<WrittenSend>(std::move(b));
    }
  }
};

struct GlooComm {
  std::shared_ptr<gloo::rendezvous::Context> context;
  // Every collective gets its own tag so that a message left over from an aborted one can never
  // be matched by the next. All ranks issue the same sequence, so their tags agree.
  uint32_t tag = 0;
  // The reduce-scatter's constructor registers its buffers with the pairs under slots that it
  // takes from the context, so it is built once for a buffer and count and then reused.
  std::unique_ptr<ReduceScatter> reduce_scatter;
  float* reduce_scatter_buf = nullptr;
  size_t reduce_scatter_count = 0;
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

// Whether any rank has flag set: an allreduce of one integer, which no rank leaves before every
// rank has entered it.
bool any_rank(GlooComm* g, bool flag) {
  uint32_t n = flag ? 1 : 0;
  ring_sum(g, &n, 1);
  return n > 0;
}

void barrier(GlooComm* g) {
  gloo::BarrierOptions opts(g->context);
  opts.setTag(g->tag++);
  gloo::barrier(opts);
}

// Gloo's halving-doubling reduce-scatter, with what its run() leaves to the caller.
//
// Every rank must build it at the same point in its sequence of collectives (the constructor
// takes slots from the context and registers receive buffers with the pairs), but a buffer's
// address is each rank's own: one rank may reallocate while another keeps its buffer. So the
// ranks first agree whether any of them needs a new one, and then all of them rebuild together.
//
// run() returns while peers may still be inside it, and nothing in it tells a sender that its
// receiver is done. Without a meeting point after it, (1) a rank that returns and then closes its
// connections makes a peer still inside run() fail, because Gloo's old-style receive reports the
// closed connection before a notification that has already arrived; and (2) in a world whose size
// is not a power of two, a rank outside the largest power-of-two block could start the next call
// and overwrite, in the receive buffer of a slower rank, data that rank has not yet added in. A
// barrier after run() rules out both.
//
// The result of rank r lands at the start of the buffer, not in block r, and is moved there.
void reduce_scatter(GlooComm* g, float* buf, size_t count) {
  const int size = g->context->size;
  const int rank = g->context->rank;
  bool stale =
      !g->reduce_scatter || g->reduce_scatter_buf != buf || g->reduce_scatter_count != count;
  if (any_rank(g, stale)) {
    g->reduce_scatter.reset();
    std::vector<int> per_rank(size, static_cast<int>(count));
    g->reduce_scatter =
        std::make_unique<ReduceScatter>(g->context, buf, static_cast<int>(count * size), per_rank);
    g->reduce_scatter_buf = buf;
    g->reduce_scatter_count = count;
  }
  g->reduce_scatter->run();
  barrier(g);
  if (rank > 0) memmove(buf + rank * count, buf, count * sizeof(float));
}

int gloo_reduce_scatter_sum(void* impl, float* buf, size_t count, char* err, size_t errlen) {
  auto* g = static_cast<GlooComm*>(impl);
  size_t size = static_cast<size_t>(g->context->size);
  // Gloo keeps the element and byte counts of the whole buffer in an int.
  if (count > static_cast<size_t>(INT_MAX) / sizeof(float) / size) {
    snprintf(err, errlen,
             "gloo's reduce-scatter counts bytes in an int: %zu blocks of %zu floats exceed %d "
             "bytes",
             size, count, INT_MAX);
    return ZN_ERR_INVALID;
  }
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
