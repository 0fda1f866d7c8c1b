/* The RPC layer over gRPC core; see zn_rpc.h for the contract.
 *
 * Server side: one completion queue, polled by the thread in
 * zn_rpc_server_run. Each registered method always has one call requested in
 * advance; when it arrives we request the next one, decode the request and
 * hand it to the method's handler. A call object counts its outstanding
 * batches (receive-close, write, send-status) and is freed when none is left
 * and it has either sent its status or seen its client leave. Stream writes
 * are queued, since gRPC allows one write in flight per call. Before a
 * handler runs, the call's credentials are checked: a bearer token for the
 * methods under the token's prefix, a verified client certificate for the
 * others when the listener has a client CA.
 *
 * Client side: each call gets its own pluck queue and blocks on it. */
#include "zn_rpc.h"

#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zn_err.h"
#include "zn_log.h"

static pthread_once_t grpc_once = PTHREAD_ONCE_INIT;

static void grpc_start(void) {
  grpc_init();
}

const char* zn_rpc_code_name(int code) {
  static const char* names[] = {"OK",
                                "CANCELLED",
                                "UNKNOWN",
                                "INVALID_ARGUMENT",
                                "DEADLINE_EXCEEDED",
                                "NOT_FOUND",
                                "ALREADY_EXISTS",
                                "PERMISSION_DENIED",
                                "RESOURCE_EXHAUSTED",
                                "FAILED_PRECONDITION",
                                "ABORTED",
                                "OUT_OF_RANGE",
                                "UNIMPLEMENTED",
                                "INTERNAL",
                                "UNAVAILABLE",
                                "DATA_LOSS",
                                "UNAUTHENTICATED"};
  if (code < 0 || code > 16) return "UNKNOWN";
  return names[code];
}

void* zn_rpc_clone_message(const ProtobufCMessage* msg) {
  size_t len = protobuf_c_message_get_packed_size(msg);
  uint8_t* buf = malloc(len ? len : 1);
  protobuf_c_message_pack(msg, buf);
  void* copy = protobuf_c_message_unpack(msg->descriptor, NULL, len, buf);
  free(buf);
  return copy;
}

static gpr_timespec deadline_after_ms(int ms) {
  if (ms <= 0) return gpr_inf_future(GPR_CLOCK_REALTIME);
  return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

static grpc_byte_buffer* pack_message(const ProtobufCMessage* msg) {
  size_t len = protobuf_c_message_get_packed_size(msg);
  grpc_slice slice = grpc_slice_malloc(len);
  protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(slice));
  grpc_byte_buffer* bb = grpc_raw_byte_buffer_create(&slice, 1);
  grpc_slice_unref(slice);
  return bb;
}

/* NULL when the bytes are not a valid message of that type. */
static ProtobufCMessage* unpack_message(grpc_byte_buffer* bb,
                                        const ProtobufCMessageDescriptor* type) {
  grpc_byte_buffer_reader reader;
  if (!grpc_byte_buffer_reader_init(&reader, bb)) return NULL;
  grpc_slice all = grpc_byte_buffer_reader_readall(&reader);
  grpc_byte_buffer_reader_destroy(&reader);
  ProtobufCMessage* msg =
      protobuf_c_message_unpack(type, NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
  grpc_slice_unref(all);
  return msg;
}

/* ================================================================ server */

/* Client certificates are requested and verified in the handshake but not
 * required there: a handshake failure would reach the client as a bare
 * "connection closed", while a call refused after it says what to fix. */

typedef enum { TAG_NEW, TAG_CLOSE, TAG_WRITE, TAG_STATUS } tag_kind;

typedef struct {
  tag_kind kind;
  zn_rpc_call* call;
} call_tag;

typedef struct method {
  char* path;
  zn_rpc_kind kind;
  const ProtobufCMessageDescriptor* request_type;
  zn_rpc_handler handler;
  void* ud;
  void* registered;
  struct method* next;
} method;

typedef struct queued_write {
  grpc_byte_buffer* payload;
  struct queued_write* next;
} queued_write;

struct zn_rpc_call {
  zn_rpc_server* server;
  method* method;
  grpc_call* call;
  gpr_timespec deadline;
  grpc_metadata_array request_metadata;
  grpc_call_details details; /* method name; filled for calls to unknown methods only */
  grpc_byte_buffer* request_payload;
  ProtobufCMessage* request;
  call_tag tag_new, tag_close, tag_write, tag_status;

  int pending; /* batches in flight */
  int initial_md_sent;
  int status_started; /* the final status batch has been started */
  int client_gone;    /* receive-close completed with cancelled */
  int close_seen;     /* receive-close completed at all */
  int cancelled_flag; /* filled by RECV_CLOSE_ON_SERVER */

  queued_write* write_head;
  queued_write* write_tail;
  int write_in_flight;
  grpc_byte_buffer* write_payload; /* the one in flight */
  int finish_queued;               /* stream_finish called while writes remain */
  int finish_code;
  char* finish_message;
  grpc_slice status_details;

  zn_rpc_close_fn on_close;
  void* on_close_ud;
  char* peer;
};

struct zn_rpc_server {
  grpc_server* server;
  grpc_completion_queue* cq;
  method* methods;
  atomic_int stop_requested;
  int started;
  zn_rpc_tick_fn tick;
  void* tick_ud;
  int tick_ms;
  method unknown;          /* stands for every method nobody registered */
  int require_client_cert; /* calls outside auth_prefix need a verified certificate */
  char* auth_prefix;       /* calls under it need the token; NULL: none do */
  unsigned char auth_digest[SHA256_DIGEST_LENGTH]; /* of "Bearer TOKEN" */
};

static void request_call(zn_rpc_server* s, method* m);

static grpc_server_credentials* server_credentials(const zn_rpc_server_tls* tls) {
  if (!tls) return grpc_insecure_server_credentials_create();
  grpc_ssl_pem_key_cert_pair pair = {tls->private_key, tls->cert_chain};
  grpc_ssl_client_certificate_request_type request =
      tls->client_ca ? GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY
                     : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE;
  return grpc_ssl_server_credentials_create_ex(tls->client_ca, &pair, 1, request, NULL);
}

int zn_rpc_server_create(const char* addr, zn_rpc_server** out, int* bound_port, char* err,
                         size_t errlen) {
  return zn_rpc_server_create_secure(addr, NULL, out, bound_port, err, errlen);
}

int zn_rpc_server_create_secure(const char* addr, const zn_rpc_server_tls* tls, zn_rpc_server** out,
                                int* bound_port, char* err, size_t errlen) {
  pthread_once(&grpc_once, grpc_start);
  zn_rpc_server* s = calloc(1, sizeof *s);
  if (!s) return ZN_ERR_NOMEM;

  grpc_arg args[1];
  args[0].type = GRPC_ARG_INTEGER;
  args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
  args[0].value.integer = ZN_RPC_MAX_REQUEST_BYTES;
  grpc_channel_args channel_args = {1, args};
  s->server = grpc_server_create(&channel_args, NULL);
  s->cq = grpc_completion_queue_create_for_next(NULL);
  grpc_server_register_completion_queue(s->server, s->cq, NULL);

  grpc_server_credentials* creds = server_credentials(tls);
  int port = grpc_server_add_http2_port(s->server, addr, creds);
  grpc_server_credentials_release(creds);
  if (port == 0) {
    snprintf(err, errlen, "cannot listen on %s: the address is malformed or already in use", addr);
    grpc_server_destroy(s->server);
    grpc_completion_queue_shutdown(s->cq);
    grpc_completion_queue_destroy(s->cq);
    free(s);
    return ZN_ERR_IO;
  }
  if (bound_port) *bound_port = port;
  s->require_client_cert = tls && tls->client_ca;
  *out = s;
  return ZN_OK;
}

static void bearer_digest(const char* value, size_t len, unsigned char* digest) {
  SHA256((const unsigned char*)value, len, digest);
}

int zn_rpc_server_set_auth(zn_rpc_server* s, const char* path_prefix, const char* token) {
  if (s->started || !token || !token[0]) return ZN_ERR_INVALID;
  size_t len = strlen("Bearer ") + strlen(token);
  char* expected = malloc(len + 1);
  if (!expected) return ZN_ERR_NOMEM;
  snprintf(expected, len + 1, "Bearer %s", token);
  bearer_digest(expected, len, s->auth_digest);
  OPENSSL_cleanse(expected, len);
  free(expected);
  free(s->auth_prefix);
  s->auth_prefix = strdup(path_prefix);
  return s->auth_prefix ? ZN_OK : ZN_ERR_NOMEM;
}

/* Ends the call and returns 0 when the server wants a client certificate and
 * the client did not present one (the handshake already verified any that
 * was presented). */
static int has_client_cert(zn_rpc_call* c) {
  if (!c->server->require_client_cert) return 1;
  grpc_auth_context* ctx = grpc_call_auth_context(c->call);
  int ok = ctx && grpc_auth_context_peer_is_authenticated(ctx);
  if (ctx) grpc_auth_context_release(ctx);
  if (!ok)
    zn_rpc_fail(c, ZN_RPC_UNAUTHENTICATED,
                "%s needs a client certificate signed by the coordinator's --tls-client-ca; "
                "give the worker --tls-cert and --tls-key (zenithctl: --cert and --key)",
                c->method->path);
  return ok;
}

/* Ends the call and returns 0 when it lacks the server's token. Digests of
 * equal length are compared in constant time, so neither the token's length
 * nor its first differing byte shows in the answer's timing. */
static int call_authorized(zn_rpc_call* c) {
  zn_rpc_server* s = c->server;
  if (!s->auth_prefix || strncmp(c->method->path, s->auth_prefix, strlen(s->auth_prefix)) != 0)
    return has_client_cert(c);
  const grpc_metadata* found = NULL;
  for (size_t i = 0; i < c->request_metadata.count; i++) {
    if (grpc_slice_str_cmp(c->request_metadata.metadata[i].key, "authorization") == 0)
      found = &c->request_metadata.metadata[i];
  }
  if (!found) {
    zn_rpc_fail(c, ZN_RPC_UNAUTHENTICATED,
                "this coordinator requires a token: give zenithctl --token, ZENITH_TOKEN or a "
                "config file");
    return 0;
  }
  unsigned char digest[SHA256_DIGEST_LENGTH];
  bearer_digest((const char*)GRPC_SLICE_START_PTR(found->value), GRPC_SLICE_LENGTH(found->value),
                digest);
  if (CRYPTO_memcmp(digest, s->auth_digest, sizeof digest) != 0) {
    zn_rpc_fail(c, ZN_RPC_PERMISSION_DENIED, "the token is not valid for this coordinator");
    return 0;
  }
  return 1;
}

int zn_rpc_server_add_method(zn_rpc_server* s, const char* path, zn_rpc_kind kind,
                             const ProtobufCMessageDescriptor* request_type, zn_rpc_handler handler,
                             void* ud) {
  if (s->started) return ZN_ERR_INVALID;
  method* m = calloc(1, sizeof *m);
  if (!m) return ZN_ERR_NOMEM;
  m->path = strdup(path);
  m->kind = kind;
  m->request_type = request_type;
  m->handler = handler;
  m->ud = ud;
  m->registered = grpc_server_register_method(s->server, m->path, NULL,
                                              GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
  m->next = s->methods;
  s->methods = m;
  return m->registered ? ZN_OK : ZN_ERR_INVALID;
}

void zn_rpc_server_set_tick(zn_rpc_server* s, int interval_ms, zn_rpc_tick_fn fn, void* ud) {
  s->tick = fn;
  s->tick_ud = ud;
  s->tick_ms = interval_ms;
}

int zn_rpc_server_start(zn_rpc_server* s) {
  grpc_server_start(s->server);
  s->started = 1;
  for (method* m = s->methods; m; m = m->next) request_call(s, m);
  s->unknown.path = "(unknown method)";
  request_call(s, &s->unknown);
  return ZN_OK;
}

void zn_rpc_server_stop(zn_rpc_server* s) {
  atomic_store(&s->stop_requested, 1);
}

static void request_call(zn_rpc_server* s, method* m) {
  zn_rpc_call* c = calloc(1, sizeof *c);
  if (!c) {
    ZN_ERROR("out of memory while waiting for calls to %s", m->path);
    return;
  }
  c->server = s;
  c->method = m;
  c->tag_new = (call_tag){TAG_NEW, c};
  c->tag_close = (call_tag){TAG_CLOSE, c};
  c->tag_write = (call_tag){TAG_WRITE, c};
  c->tag_status = (call_tag){TAG_STATUS, c};
  grpc_metadata_array_init(&c->request_metadata);
  grpc_call_details_init(&c->details);
  grpc_call_error e =
      m->registered ? grpc_server_request_registered_call(
                          s->server, m->registered, &c->call, &c->deadline, &c->request_metadata,
                          &c->request_payload, s->cq, s->cq, &c->tag_new)
                    : grpc_server_request_call(s->server, &c->call, &c->details,
                                               &c->request_metadata, s->cq, s->cq, &c->tag_new);
  if (e != GRPC_CALL_OK) {
    ZN_ERROR("cannot wait for calls to %s: %s", m->path, grpc_call_error_to_string(e));
    grpc_metadata_array_destroy(&c->request_metadata);
    grpc_call_details_destroy(&c->details);
    free(c);
  }
}

static void call_free(zn_rpc_call* c) {
  if (c->request) protobuf_c_message_free_unpacked(c->request, NULL);
  if (c->request_payload) grpc_byte_buffer_destroy(c->request_payload);
  if (c->write_payload) grpc_byte_buffer_destroy(c->write_payload);
  for (queued_write* w = c->write_head; w;) {
    queued_write* next = w->next;
    grpc_byte_buffer_destroy(w->payload);
    free(w);
    w = next;
  }
  if (c->status_started) grpc_slice_unref(c->status_details);
  grpc_metadata_array_destroy(&c->request_metadata);
  grpc_call_details_destroy(&c->details);
  if (c->call) grpc_call_unref(c->call);
  free(c->finish_message);
  free(c->peer);
  free(c);
}

/* A call is done when nothing is in flight and it can do nothing more. */
static void call_maybe_free(zn_rpc_call* c) {
  if (c->pending == 0 && c->close_seen && (c->status_started || c->client_gone)) call_free(c);
}

static void start_batch(zn_rpc_call* c, grpc_op* ops, size_t n, call_tag* tag) {
  grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);
  if (e != GRPC_CALL_OK) {
    ZN_WARN("%s: cannot start a batch: %s", c->method->path, grpc_call_error_to_string(e));
    return;
  }
  c->pending++;
}

static size_t add_initial_metadata(zn_rpc_call* c, grpc_op* op) {
  if (c->initial_md_sent) return 0;
  memset(op, 0, sizeof *op);
  op->op = GRPC_OP_SEND_INITIAL_METADATA;
  c->initial_md_sent = 1;
  return 1;
}

static void send_status(zn_rpc_call* c, int code, const char* message,
                        grpc_byte_buffer* last_message) {
  if (c->status_started || c->client_gone) {
    if (last_message) grpc_byte_buffer_destroy(last_message);
    return;
  }
  grpc_op ops[3];
  size_t n = add_initial_metadata(c, &ops[0]);
  if (last_message) {
    memset(&ops[n], 0, sizeof ops[n]);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n].data.send_message.send_message = last_message;
    c->write_payload = last_message;
    n++;
  }
  c->status_details = grpc_slice_from_copied_string(message ? message : "");
  c->status_started = 1;
  memset(&ops[n], 0, sizeof ops[n]);
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = (grpc_status_code)code;
  ops[n].data.send_status_from_server.status_details = &c->status_details;
  n++;
  start_batch(c, ops, n, &c->tag_status);
}

void zn_rpc_reply(zn_rpc_call* c, const ProtobufCMessage* response) {
  send_status(c, ZN_RPC_OK, "", pack_message(response));
}

void zn_rpc_fail(zn_rpc_call* c, int code, const char* fmt, ...) {
  char message[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(message, sizeof message, fmt, ap);
  va_end(ap);
  ZN_DEBUG("%s -> %s: %s", c->method->path, zn_rpc_code_name(code), message);
  send_status(c, code, message, NULL);
}

static void start_next_write(zn_rpc_call* c) {
  queued_write* w = c->write_head;
  c->write_head = w->next;
  if (!c->write_head) c->write_tail = NULL;
  grpc_op ops[2];
  size_t n = add_initial_metadata(c, &ops[0]);
  memset(&ops[n], 0, sizeof ops[n]);
  ops[n].op = GRPC_OP_SEND_MESSAGE;
  ops[n].data.send_message.send_message = w->payload;
  c->write_payload = w->payload;
  free(w);
  c->write_in_flight = 1;
  start_batch(c, ops, n + 1, &c->tag_write);
}

int zn_rpc_stream_write(zn_rpc_call* c, const ProtobufCMessage* msg) {
  if (c->client_gone || c->status_started || c->finish_queued) return -1;
  queued_write* w = calloc(1, sizeof *w);
  if (!w) return -1;
  w->payload = pack_message(msg);
  if (c->write_tail)
    c->write_tail->next = w;
  else
    c->write_head = w;
  c->write_tail = w;
  if (!c->write_in_flight) start_next_write(c);
  return 0;
}

void zn_rpc_stream_finish(zn_rpc_call* c, int code, const char* message) {
  if (c->write_in_flight || c->write_head) {
    c->finish_queued = 1;
    c->finish_code = code;
    c->finish_message = strdup(message ? message : "");
    return;
  }
  send_status(c, code, message, NULL);
}

void zn_rpc_call_on_close(zn_rpc_call* c, zn_rpc_close_fn fn, void* ud) {
  c->on_close = fn;
  c->on_close_ud = ud;
}

const char* zn_rpc_call_peer(zn_rpc_call* c) {
  if (!c->peer) c->peer = grpc_call_get_peer(c->call);
  return c->peer;
}

static void on_new_call(zn_rpc_server* s, zn_rpc_call* c, int ok) {
  if (!ok) { /* the server is shutting down */
    grpc_metadata_array_destroy(&c->request_metadata);
    grpc_call_details_destroy(&c->details);
    free(c);
    return;
  }
  request_call(s, c->method);

  grpc_op close_op;
  memset(&close_op, 0, sizeof close_op);
  close_op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  close_op.data.recv_close_on_server.cancelled = &c->cancelled_flag;
  start_batch(c, &close_op, 1, &c->tag_close);

  if (!c->method->registered) {
    char* path = grpc_slice_to_c_string(c->details.method);
    zn_rpc_fail(c, ZN_RPC_UNIMPLEMENTED, "unknown method %s", path);
    gpr_free(path);
    return;
  }
  if (!call_authorized(c)) return;
  if (!c->request_payload) {
    zn_rpc_fail(c, ZN_RPC_INVALID_ARGUMENT, "%s: the request carried no message", c->method->path);
    return;
  }
  c->request = unpack_message(c->request_payload, c->method->request_type);
  if (!c->request) {
    zn_rpc_fail(c, ZN_RPC_INVALID_ARGUMENT, "%s: the request is not a valid %s message",
                c->method->path, c->method->request_type->name);
    return;
  }
  c->method->handler(c->method->ud, c, c->request);
}

static void on_write_done(zn_rpc_call* c, int ok) {
  c->write_in_flight = 0;
  grpc_byte_buffer_destroy(c->write_payload);
  c->write_payload = NULL;
  if (!ok) c->client_gone = 1;
  if (c->client_gone) return;
  if (c->write_head) {
    start_next_write(c);
  } else if (c->finish_queued) {
    c->finish_queued = 0;
    send_status(c, c->finish_code, c->finish_message, NULL);
  }
}

static void on_close(zn_rpc_call* c) {
  c->close_seen = 1;
  if (c->cancelled_flag && !c->status_started) {
    c->client_gone = 1;
    if (c->on_close) c->on_close(c->on_close_ud, c);
  }
}

static void dispatch(zn_rpc_server* s, call_tag* tag, int ok) {
  /* The tag lives inside the call, which on_new_call may free: read both first. */
  zn_rpc_call* c = tag->call;
  tag_kind kind = tag->kind;
  if (kind == TAG_NEW) {
    on_new_call(s, c, ok);
    if (ok) call_maybe_free(c);
    return;
  }
  c->pending--;
  if (kind == TAG_CLOSE) {
    on_close(c);
  } else if (kind == TAG_WRITE) {
    on_write_done(c, ok);
  } else if (c->write_payload) { /* TAG_STATUS: its batch may have carried a reply */
    grpc_byte_buffer_destroy(c->write_payload);
    c->write_payload = NULL;
  }
  call_maybe_free(c);
}

void zn_rpc_server_run(zn_rpc_server* s) {
  gpr_timespec next_tick = gpr_now(GPR_CLOCK_MONOTONIC);
  int poll_ms = s->tick ? s->tick_ms : 100;
  if (poll_ms > 100) poll_ms = 100;
  while (!atomic_load(&s->stop_requested)) {
    grpc_event ev = grpc_completion_queue_next(s->cq, deadline_after_ms(poll_ms), NULL);
    if (ev.type == GRPC_OP_COMPLETE) dispatch(s, (call_tag*)ev.tag, ev.success);
    if (s->tick && gpr_time_cmp(gpr_now(GPR_CLOCK_MONOTONIC), next_tick) >= 0) {
      s->tick(s->tick_ud);
      next_tick = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                               gpr_time_from_millis(s->tick_ms, GPR_TIMESPAN));
    }
  }

  /* Shut down: cancel every call; the queue is drained in destroy. */
  grpc_server_shutdown_and_notify(s->server, s->cq, NULL);
  grpc_server_cancel_all_calls(s->server);
}

/* Every call still known to the queue comes back once more, failed; each
 * dispatch then frees it, so a stopped server leaks nothing. */
void zn_rpc_server_destroy(zn_rpc_server* s) {
  if (!s) return;
  if (s->started && !atomic_load(&s->stop_requested)) {
    grpc_server_shutdown_and_notify(s->server, s->cq, NULL);
    grpc_server_cancel_all_calls(s->server);
  }
  if (!s->started) grpc_server_shutdown_and_notify(s->server, s->cq, NULL);
  grpc_completion_queue_shutdown(s->cq);
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
    if (ev.type == GRPC_OP_COMPLETE && ev.tag) dispatch(s, (call_tag*)ev.tag, ev.success);
  }
  grpc_server_destroy(s->server);
  grpc_completion_queue_destroy(s->cq);
  for (method* m = s->methods; m;) {
    method* next = m->next;
    free(m->path);
    free(m);
    m = next;
  }
  free(s->auth_prefix);
  free(s);
}

/* ================================================================ client */

struct zn_rpc_channel {
  grpc_channel* channel;
  char* target;
  int wait_for_ready;
  grpc_metadata auth; /* "authorization: Bearer TOKEN"; count 0 without a token */
  size_t auth_count;
};

static grpc_channel_credentials* channel_credentials(const zn_rpc_client_opts* opts) {
  if (!opts || !opts->tls) return grpc_insecure_credentials_create();
  grpc_ssl_pem_key_cert_pair pair = {opts->client_key, opts->client_cert};
  int with_cert = opts->client_cert && opts->client_key;
  return grpc_ssl_credentials_create(opts->ca, with_cert ? &pair : NULL, NULL, NULL);
}

static void set_token(zn_rpc_channel* ch, const char* token) {
  size_t len = strlen("Bearer ") + strlen(token);
  grpc_slice value = grpc_slice_malloc(len + 1);
  snprintf((char*)GRPC_SLICE_START_PTR(value), len + 1, "Bearer %s", token);
  ch->auth.key = grpc_slice_from_static_string("authorization");
  ch->auth.value = grpc_slice_sub(value, 0, len);
  grpc_slice_unref(value);
  ch->auth_count = 1;
}

zn_rpc_channel* zn_rpc_channel_open(const char* target, int wait_for_ready) {
  return zn_rpc_channel_open_with(target, wait_for_ready, NULL);
}

zn_rpc_channel* zn_rpc_channel_open_with(const char* target, int wait_for_ready,
                                         const zn_rpc_client_opts* opts) {
  pthread_once(&grpc_once, grpc_start);
  zn_rpc_channel* ch = calloc(1, sizeof *ch);
  if (!ch) return NULL;
  grpc_arg args[1];
  args[0].type = GRPC_ARG_INTEGER;
  args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
  args[0].value.integer = 64 << 20;
  grpc_channel_args channel_args = {1, args};
  grpc_channel_credentials* creds = channel_credentials(opts);
  ch->channel = grpc_channel_create(target, creds, &channel_args);
  grpc_channel_credentials_release(creds);
  ch->target = strdup(target);
  ch->wait_for_ready = wait_for_ready;
  if (opts && opts->token && opts->token[0]) set_token(ch, opts->token);
  return ch;
}

void zn_rpc_channel_close(zn_rpc_channel* ch) {
  if (!ch) return;
  grpc_channel_destroy(ch->channel);
  if (ch->auth_count) grpc_slice_unref(ch->auth.value);
  free(ch->target);
  free(ch);
}

const char* zn_rpc_channel_target(const zn_rpc_channel* ch) {
  return ch->target;
}

static void set_status(zn_rpc_status* st, int code, grpc_slice details) {
  if (!st) return;
  st->code = code;
  size_t len = GRPC_SLICE_LENGTH(details);
  if (len >= sizeof st->message) len = sizeof st->message - 1;
  memcpy(st->message, GRPC_SLICE_START_PTR(details), len);
  st->message[len] = '\0';
}

static void set_status_text(zn_rpc_status* st, int code, const char* text) {
  if (!st) return;
  st->code = code;
  snprintf(st->message, sizeof st->message, "%s", text);
}

/* Runs one batch on a pluck queue and waits for it. */
static int run_batch(grpc_call* call, grpc_completion_queue* cq, grpc_op* ops, size_t n) {
  int tag = 0;
  if (grpc_call_start_batch(call, ops, n, &tag, NULL) != GRPC_CALL_OK) return 0;
  grpc_event ev = grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  return ev.type == GRPC_OP_COMPLETE && ev.success;
}

static void destroy_pluck_queue(grpc_completion_queue* cq) {
  grpc_completion_queue_shutdown(cq);
  while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
         GRPC_QUEUE_SHUTDOWN) {
  }
  grpc_completion_queue_destroy(cq);
}

static void fill_send_ops(zn_rpc_channel* ch, grpc_op* ops, grpc_byte_buffer* payload) {
  memset(ops, 0, 3 * sizeof *ops);
  ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
  ops[0].data.send_initial_metadata.count = ch->auth_count;
  ops[0].data.send_initial_metadata.metadata = &ch->auth;
  if (ch->wait_for_ready) ops[0].flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY;
  ops[1].op = GRPC_OP_SEND_MESSAGE;
  ops[1].data.send_message.send_message = payload;
  ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
}

int zn_rpc_unary(zn_rpc_channel* ch, const char* path, const ProtobufCMessage* request,
                 const ProtobufCMessageDescriptor* response_type, int timeout_ms,
                 ProtobufCMessage** response, zn_rpc_status* status) {
  *response = NULL;
  grpc_completion_queue* cq = grpc_completion_queue_create_for_pluck(NULL);
  grpc_slice method = grpc_slice_from_copied_string(path);
  grpc_call* call = grpc_channel_create_call(ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, cq, method,
                                             NULL, deadline_after_ms(timeout_ms), NULL);
  grpc_slice_unref(method);

  grpc_byte_buffer* payload = pack_message(request);
  grpc_metadata_array initial_md, trailing_md;
  grpc_metadata_array_init(&initial_md);
  grpc_metadata_array_init(&trailing_md);
  grpc_byte_buffer* reply = NULL;
  grpc_status_code code = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();

  grpc_op ops[6];
  fill_send_ops(ch, ops, payload);
  memset(&ops[3], 0, 3 * sizeof ops[0]);
  ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
  ops[3].data.recv_initial_metadata.recv_initial_metadata = &initial_md;
  ops[4].op = GRPC_OP_RECV_MESSAGE;
  ops[4].data.recv_message.recv_message = &reply;
  ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  ops[5].data.recv_status_on_client.trailing_metadata = &trailing_md;
  ops[5].data.recv_status_on_client.status = &code;
  ops[5].data.recv_status_on_client.status_details = &details;

  int rc = ZN_ERR_RPC;
  if (!run_batch(call, cq, ops, 6)) {
    set_status_text(status, ZN_RPC_INTERNAL, "the call could not be run");
  } else if (code != GRPC_STATUS_OK) {
    set_status(status, code, details);
  } else if (!reply || !(*response = unpack_message(reply, response_type))) {
    set_status_text(status, ZN_RPC_INTERNAL, "the response is not a valid message");
  } else {
    set_status_text(status, ZN_RPC_OK, "");
    rc = ZN_OK;
  }

  if (reply) grpc_byte_buffer_destroy(reply);
  grpc_byte_buffer_destroy(payload);
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&initial_md);
  grpc_metadata_array_destroy(&trailing_md);
  grpc_call_unref(call);
  destroy_pluck_queue(cq);
  return rc;
}

struct zn_rpc_stream {
  grpc_call* call;
  grpc_completion_queue* cq;
  const ProtobufCMessageDescriptor* response_type;
  grpc_metadata_array initial_md;
  int got_initial_md;
  int ended;
};

int zn_rpc_stream_open(zn_rpc_channel* ch, const char* path, const ProtobufCMessage* request,
                       const ProtobufCMessageDescriptor* response_type, zn_rpc_stream** out,
                       zn_rpc_status* status) {
  zn_rpc_stream* st = calloc(1, sizeof *st);
  if (!st) return ZN_ERR_NOMEM;
  st->cq = grpc_completion_queue_create_for_pluck(NULL);
  st->response_type = response_type;
  grpc_metadata_array_init(&st->initial_md);
  grpc_slice method = grpc_slice_from_copied_string(path);
  st->call = grpc_channel_create_call(ch->channel, NULL, GRPC_PROPAGATE_DEFAULTS, st->cq, method,
                                      NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
  grpc_slice_unref(method);

  grpc_byte_buffer* payload = pack_message(request);
  grpc_op ops[3];
  fill_send_ops(ch, ops, payload);
  /* A failed send means the server is unreachable; the first next() reads
   * the status that says so. */
  run_batch(st->call, st->cq, ops, 3);
  grpc_byte_buffer_destroy(payload);
  set_status_text(status, ZN_RPC_OK, "");
  *out = st;
  return ZN_OK;
}

static void stream_read_status(zn_rpc_stream* st, zn_rpc_status* status) {
  grpc_metadata_array trailing_md;
  grpc_metadata_array_init(&trailing_md);
  grpc_status_code code = GRPC_STATUS_UNKNOWN;
  grpc_slice details = grpc_empty_slice();
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
  op.data.recv_status_on_client.trailing_metadata = &trailing_md;
  op.data.recv_status_on_client.status = &code;
  op.data.recv_status_on_client.status_details = &details;
  if (run_batch(st->call, st->cq, &op, 1))
    set_status(status, code, details);
  else
    set_status_text(status, ZN_RPC_INTERNAL, "the stream's status could not be read");
  grpc_slice_unref(details);
  grpc_metadata_array_destroy(&trailing_md);
  st->ended = 1;
}

int zn_rpc_stream_next(zn_rpc_stream* st, ProtobufCMessage** msg, zn_rpc_status* status) {
  *msg = NULL;
  if (st->ended) return 0;
  grpc_byte_buffer* payload = NULL;
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  size_t n = 0;
  if (!st->got_initial_md) {
    ops[n].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[n++].data.recv_initial_metadata.recv_initial_metadata = &st->initial_md;
    st->got_initial_md = 1;
  }
  ops[n].op = GRPC_OP_RECV_MESSAGE;
  ops[n++].data.recv_message.recv_message = &payload;
  if (!run_batch(st->call, st->cq, ops, n) || !payload) {
    stream_read_status(st, status);
    return 0;
  }
  *msg = unpack_message(payload, st->response_type);
  grpc_byte_buffer_destroy(payload);
  if (!*msg) {
    grpc_call_cancel(st->call, NULL);
    stream_read_status(st, status);
    set_status_text(status, ZN_RPC_INTERNAL, "the stream carried an invalid message");
    return 0;
  }
  return 1;
}

void zn_rpc_stream_close(zn_rpc_stream* st) {
  if (!st) return;
  if (!st->ended) {
    grpc_call_cancel(st->call, NULL);
    zn_rpc_status ignored;
    stream_read_status(st, &ignored);
  }
  grpc_metadata_array_destroy(&st->initial_md);
  grpc_call_unref(st->call);
  destroy_pluck_queue(st->cq);
  free(st);
}
