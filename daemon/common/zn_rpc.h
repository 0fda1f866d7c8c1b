/* Zenith's RPC layer: gRPC core (grpc.h) carrying protobuf-c messages.
 *
 * This is the only module that includes grpc.h. A server runs one
 * completion-queue loop on the thread that calls zn_rpc_server_run; every
 * handler, tick and close callback runs on that thread, so a service built on
 * it needs no locks. A handler may answer at once or keep the call and answer
 * later (a key wait, a watch stream): the call stays valid until it is
 * finished or until its close callback says the client went away.
 *
 * A server listens in plain text or over TLS, optionally asking clients for a
 * certificate (mutual TLS) and some methods for a bearer token.
 *
 * Clients are synchronous: each call blocks its thread until the answer or the
 * deadline, and reports the gRPC status code and message. */
#ifndef ZN_RPC_H
#define ZN_RPC_H

#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

/* gRPC status codes, as the wire defines them. */
enum {
  ZN_RPC_OK = 0,
  ZN_RPC_CANCELLED = 1,
  ZN_RPC_UNKNOWN = 2,
  ZN_RPC_INVALID_ARGUMENT = 3,
  ZN_RPC_DEADLINE_EXCEEDED = 4,
  ZN_RPC_NOT_FOUND = 5,
  ZN_RPC_ALREADY_EXISTS = 6,
  ZN_RPC_PERMISSION_DENIED = 7,
  ZN_RPC_RESOURCE_EXHAUSTED = 8,
  ZN_RPC_FAILED_PRECONDITION = 9,
  ZN_RPC_UNIMPLEMENTED = 12,
  ZN_RPC_INTERNAL = 13,
  ZN_RPC_UNAVAILABLE = 14,
  ZN_RPC_UNAUTHENTICATED = 16,
};

/* Largest message a server accepts; larger ones get RESOURCE_EXHAUSTED. */
#define ZN_RPC_MAX_REQUEST_BYTES (4 << 20)

const char* zn_rpc_code_name(int code);

/* A deep copy of a message whose every part is malloc'd, so that it can be
 * edited field by field and released with protobuf_c_message_free_unpacked. */
void* zn_rpc_clone_message(const ProtobufCMessage* msg);

/* ------------------------------------------------------------ server */

typedef struct zn_rpc_server zn_rpc_server;
typedef struct zn_rpc_call zn_rpc_call;

typedef enum { ZN_RPC_UNARY, ZN_RPC_SERVER_STREAM } zn_rpc_kind;

/* `request` belongs to the call and lives until the call ends. */
typedef void (*zn_rpc_handler)(void* ud, zn_rpc_call* call, const ProtobufCMessage* request);
typedef void (*zn_rpc_close_fn)(void* ud, zn_rpc_call* call);
typedef void (*zn_rpc_tick_fn)(void* ud);

/* Binds addr ("127.0.0.1:7070", "[::]:0"); *bound_port gets the port. */
int zn_rpc_server_create(const char* addr, zn_rpc_server** out, int* bound_port, char* err,
                         size_t errlen);

/* PEM text, not file names; the strings are copied by gRPC at creation. */
typedef struct {
  const char* cert_chain;
  const char* private_key;
  /* Set: clients are asked for a certificate, which must be signed by this
   * CA, and every call outside the token's prefix (zn_rpc_server_set_auth)
   * needs one (mutual TLS). NULL: clients are not asked for one. */
  const char* client_ca;
} zn_rpc_server_tls;

/* Like zn_rpc_server_create, over TLS when tls is not NULL. */
int zn_rpc_server_create_secure(const char* addr, const zn_rpc_server_tls* tls, zn_rpc_server** out,
                                int* bound_port, char* err, size_t errlen);
/* Calls to methods whose path starts with path_prefix must carry the
 * metadata "authorization: Bearer TOKEN": without it they end UNAUTHENTICATED,
 * with another value PERMISSION_DENIED, before any handler runs. The token
 * replaces the client certificate for those methods, so that users need no
 * certificate of their own. Only a digest of the token is kept. Only before
 * zn_rpc_server_start. */
int zn_rpc_server_set_auth(zn_rpc_server* s, const char* path_prefix, const char* token);
/* path is "/package.Service/Method". Only before zn_rpc_server_start. */
int zn_rpc_server_add_method(zn_rpc_server* s, const char* path, zn_rpc_kind kind,
                             const ProtobufCMessageDescriptor* request_type, zn_rpc_handler handler,
                             void* ud);
/* Calls fn every interval_ms on the server thread (timers, liveness checks). */
void zn_rpc_server_set_tick(zn_rpc_server* s, int interval_ms, zn_rpc_tick_fn fn, void* ud);
int zn_rpc_server_start(zn_rpc_server* s);
/* Serves until zn_rpc_server_stop; then cancels what is left and returns. */
void zn_rpc_server_run(zn_rpc_server* s);
/* Safe from any thread and from a signal handler: it only sets a flag. */
void zn_rpc_server_stop(zn_rpc_server* s);
void zn_rpc_server_destroy(zn_rpc_server* s);

/* Answers a unary call with OK and `response`; the call ends. */
void zn_rpc_reply(zn_rpc_call* call, const ProtobufCMessage* response);
/* Ends a call with a status code and a message that says what to fix. */
void zn_rpc_fail(zn_rpc_call* call, int code, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Queues one message on a server stream. Returns -1 when the client is gone. */
int zn_rpc_stream_write(zn_rpc_call* call, const ProtobufCMessage* msg);
/* Ends a stream once its queued messages are sent. */
void zn_rpc_stream_finish(zn_rpc_call* call, int code, const char* message);
/* For calls kept past their handler: fn runs if the client leaves first. */
void zn_rpc_call_on_close(zn_rpc_call* call, zn_rpc_close_fn fn, void* ud);
/* The client's address, e.g. "ipv4:127.0.0.1:50312". */
const char* zn_rpc_call_peer(zn_rpc_call* call);

/* ------------------------------------------------------------ client */

typedef struct zn_rpc_channel zn_rpc_channel;

typedef struct {
  int code;
  char message[512];
} zn_rpc_status;

/* wait_for_ready: calls wait (up to their deadline) for the server to come
 * up instead of failing at once; workers use it, the CLI does not. */
zn_rpc_channel* zn_rpc_channel_open(const char* target, int wait_for_ready);

/* How a channel reaches its server. All zero: plain text, no token. */
typedef struct {
  int tls;                 /* 1: TLS, verifying the server against ca (PEM) */
  const char* ca;          /* NULL with tls: the system's trusted roots */
  const char* client_cert; /* PEM chain and key for mutual TLS; NULL: none */
  const char* client_key;
  const char* token; /* sent as "authorization: Bearer TOKEN" with every call */
} zn_rpc_client_opts;

/* Like zn_rpc_channel_open, with credentials; opts may be NULL. */
zn_rpc_channel* zn_rpc_channel_open_with(const char* target, int wait_for_ready,
                                         const zn_rpc_client_opts* opts);
void zn_rpc_channel_close(zn_rpc_channel* ch);
const char* zn_rpc_channel_target(const zn_rpc_channel* ch);

/* One request, one response. Returns 0 with *response set (free it with
 * protobuf_c_message_free_unpacked), or ZN_ERR_RPC with *status filled. */
int zn_rpc_unary(zn_rpc_channel* ch, const char* path, const ProtobufCMessage* request,
                 const ProtobufCMessageDescriptor* response_type, int timeout_ms,
                 ProtobufCMessage** response, zn_rpc_status* status);

typedef struct zn_rpc_stream zn_rpc_stream;

int zn_rpc_stream_open(zn_rpc_channel* ch, const char* path, const ProtobufCMessage* request,
                       const ProtobufCMessageDescriptor* response_type, zn_rpc_stream** out,
                       zn_rpc_status* status);
/* 1: *msg holds the next message. 0: the stream ended, *status says how. */
int zn_rpc_stream_next(zn_rpc_stream* st, ProtobufCMessage** msg, zn_rpc_status* status);
/* Cancels the stream if it has not ended. */
void zn_rpc_stream_close(zn_rpc_stream* st);

#endif
