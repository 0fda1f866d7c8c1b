/* The Gloo backend: a thin C++ wrapper that gives zn_comm.c a C table of operations over Gloo's
 * TCP transport. The only C++ in the daemon, and only as much as Gloo's API needs.
 *
 * Peers meet through a gloo::rendezvous::Store built on the caller's zn_kv callbacks: each rank
 * publishes its listening address under "<prefix>/<rank>" and connects a full mesh. Every Gloo
 * exception is caught here and becomes ZN_ERR_COMM with its message; none crosses into C.
 *
 * The sums use Gloo's ring algorithm: each segment of the buffer is reduced on one rank in a fixed
 * order and then copied to all others, so every rank ends with the same bits, and the same inputs
 * give the same bits on every run. */
#include "zn_comm_backend.h"

#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

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

struct GlooComm {
  std::shared_ptr<gloo::rendezvous::Context> context;
  // Every collective gets its own tag so that a message left over from an aborted one can never
  // be matched by the next. All ranks issue the same sequence, so their tags agree.
  uint32_t tag = 0;
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
  return guarded(
      [&] {
        gloo::BarrierOptions opts(g->context);
        opts.setTag(g->tag++);
        gloo::barrier(opts);
      },
      err, errlen);
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
    "gloo", gloo_allreduce_sum, gloo_broadcast, gloo_barrier, gloo_destroy, nullptr, nullptr,
};

}  // namespace

extern "C" int zn_comm_create_gloo(const zn_comm_config* cfg, const zn_kv* kv, zn_comm** out,
                                   char* err, size_t errlen) {
  return zn_comm_create_with(cfg, kv, &gloo_ops, gloo_connect, nullptr, out, err, errlen);
}
