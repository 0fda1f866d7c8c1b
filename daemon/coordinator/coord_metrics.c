/* The coordinator's Prometheus endpoint; see coord_metrics.h for the two threads.
 *
 * Rendering. The text format wants every sample of a family together, under one HELP and
 * one TYPE line, so a job's text is kept family by family: one string with an offset per
 * family, and a page is put together family by family from every job's pieces. A queued or
 * running job is rendered again for each snapshot; a job that has ended is rendered once,
 * when it ends, and its text is reused until it is an hour old.
 *
 * Which jobs. Per-job series cover the queued and running jobs and those that finished
 * within the last hour: a coordinator that has run thousands of jobs still answers with a
 * page of bounded size, and an hour is far longer than any scrape interval, so a job's final
 * values are scraped at least once. zenith_jobs counts every job in the store by state; the
 * store is asked again when a job ended, when the active jobs or their states changed since
 * the last snapshot, and every RECOUNT_MS, never on every tick.
 *
 * The listening socket is made here rather than by libmicrohttpd, so that a bind failure
 * comes back with its errno for a clear start-up error and port 0 can be read back. The
 * server's thread starts with SIGINT and SIGTERM blocked, so they reach the coordinator. */
#include "coord_metrics.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <microhttpd.h>

#include "zn_err.h"
#include "zn_log.h"
#include "zn_time.h"

#define RECENT_MS (3600 * 1000) /* a finished job keeps its series this long */
#define RECOUNT_MS 10000        /* zenith_jobs is read from the store at least this often */
#define MAX_STATES 16           /* JobState values counted in zenith_jobs */
#define PAGE_TYPE "text/plain; version=0.0.4; charset=utf-8"

typedef Zenith__V1__Job Job;

/* ---------------------------------------------------------------- text */

/* A growing string; after a failed allocation it stays failed and the page is not published. */
typedef struct {
  char* p;
  size_t len, cap;
  int failed;
} sbuf;

static int sb_reserve(sbuf* b, size_t more) {
  if (b->failed) return -1;
  if (b->len + more + 1 <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 4096;
  while (cap < b->len + more + 1) cap *= 2;
  char* p = realloc(b->p, cap);
  if (!p) {
    b->failed = 1;
    return -1;
  }
  b->p = p;
  b->cap = cap;
  return 0;
}

static void sb_append(sbuf* b, const char* s, size_t n) {
  if (sb_reserve(b, n) != 0) return;
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_printf(sbuf* b, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf* b, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0 || sb_reserve(b, (size_t)n) != 0) return;
  va_start(ap, fmt);
  vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

/* A label value as the format wants it: backslash, double quote and newline escaped. */
static void sb_label_value(sbuf* b, const char* v) {
  for (; *v; v++) {
    if (*v == '\\')
      sb_append(b, "\\\\", 2);
    else if (*v == '"')
      sb_append(b, "\\\"", 2);
    else if (*v == '\n')
      sb_append(b, "\\n", 2);
    else
      sb_append(b, v, 1);
  }
}

/* The shortest decimal that reads back as the same double, so a scraped value equals the one
 * GetJob returns; NaN and the infinities as the format spells them. */
static void sb_value(sbuf* b, double v) {
  if (isnan(v)) {
    sb_append(b, "NaN", 3);
    return;
  }
  if (isinf(v)) {
    sb_append(b, v > 0 ? "+Inf" : "-Inf", 4);
    return;
  }
  char text[40];
  for (int digits = 15; digits <= 17; digits++) {
    snprintf(text, sizeof text, "%.*g", digits, v);
    if (strtod(text, NULL) == v) break;
  }
  sb_append(b, text, strlen(text));
}

/* One sample: name{labels[,key="value"]} v. labels are already escaped. */
static void sb_sample(sbuf* b, const char* name, const char* labels, const char* key,
                      const char* value, double v) {
  sb_printf(b, "%s{%s", name, labels);
  if (key) {
    sb_printf(b, "%s%s=\"", labels[0] ? "," : "", key);
    sb_label_value(b, value);
    sb_append(b, "\"", 1);
  }
  sb_append(b, "} ", 2);
  sb_value(b, v);
  sb_append(b, "\n", 1);
}

/* ---------------------------------------------------------------- families */

typedef struct {
  const char* name;
  const char* type;
  const char* help;
} family;

static const family workers_family = {
    "zenith_workers", "gauge",
    "Live workers registered with the coordinator, by state (idle, busy) and device (cpu, cuda)."};
static const family jobs_family = {"zenith_jobs", "gauge",
                                   "Jobs in the coordinator's database, by state."};

enum {
  JF_STATE,
  JF_STEPS,
  JF_PROGRESS,
  JF_EPOCH,
  JF_LOSS,
  JF_LR,
  JF_GRAD_NORM,
  JF_WINDOW_MEAN,
  JF_PEAK,
  JF_IMAGES,
  JF_SKIPPED,
  JF_RESTARTS,
  JF_CHECKPOINTS,
  JF_TEST_ACCURACY,
  JF_N
};

static const family job_families[JF_N] = {
    [JF_STATE] = {"zenith_job_state", "gauge",
                  "Always 1: the job's state is the state label (queued, running, succeeded, "
                  "failed, cancelled)."},
    [JF_STEPS] = {"zenith_job_steps_total", "counter",
                  "Optimizer steps the job has taken, skipped ones included."},
    [JF_PROGRESS] = {"zenith_job_progress_ratio", "gauge",
                     "Steps taken over the steps the job will run (once a worker knows them)."},
    [JF_EPOCH] = {"zenith_job_epoch", "gauge", "Epoch of the last step, from 1."},
    [JF_LOSS] = {"zenith_job_loss", "gauge", "Mean training loss of the last step's batch."},
    [JF_LR] = {"zenith_job_lr", "gauge", "ZENITH learning rate eta_t of the last step."},
    [JF_GRAD_NORM] = {"zenith_job_grad_norm", "gauge",
                      "Global norm n_t of the last step's reduced gradient."},
    [JF_WINDOW_MEAN] = {"zenith_job_window_mean", "gauge",
                        "Sliding-window mean m_t of the gradient norm."},
    [JF_PEAK] = {"zenith_job_peak", "gauge", "Highest window mean so far, M_t."},
    [JF_IMAGES] = {"zenith_job_images_per_second", "gauge",
                   "Global training throughput over the last steps, in images per second."},
    [JF_SKIPPED] = {"zenith_job_skipped_steps_total", "counter",
                    "Steps skipped, by reason: non_finite (the norm was NaN or infinite) or spike "
                    "(the norm was above spike_factor times the peak)."},
    [JF_RESTARTS] = {"zenith_job_restarts_total", "counter",
                     "Times the job was restarted after losing a worker."},
    [JF_CHECKPOINTS] = {"zenith_job_checkpoints_total", "counter",
                        "Checkpoints the job has written, kept or not."},
    [JF_TEST_ACCURACY] = {"zenith_job_test_accuracy", "gauge",
                          "Test-set accuracy of the job's final evaluation, a fraction in [0, 1]."},
};

static void sb_family(sbuf* b, const family* f) {
  sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", f->name, f->help, f->name, f->type);
}

/* "queued", "running", ...: the JobState name in lower case. */
static void state_label(int state, char* out, size_t len) {
  const ProtobufCEnumValue* v =
      protobuf_c_enum_descriptor_get_value(&zenith__v1__job_state__descriptor, state);
  snprintf(out, len, "%s", v ? v->name : "unknown");
  for (char* p = out; *p; p++) *p = (char)tolower((unsigned char)*p);
}

/* The one sample of a per-job family, when the job has a value for it yet. */
static int job_value(const Job* job, int f, double* v) {
  const Zenith__V1__StepMetrics* last = job->last;
  switch (f) {
    case JF_STEPS:
      *v = (double)job->step;
      return 1;
    case JF_PROGRESS:
      *v = job->total_steps > 0 ? (double)job->step / (double)job->total_steps : 0;
      return job->total_steps > 0;
    case JF_EPOCH:
      *v = job->epoch;
      return job->has_epoch;
    case JF_LOSS:
      *v = last ? last->loss : 0;
      return last && last->has_loss;
    case JF_LR:
      *v = last ? last->lr : 0;
      return last && last->has_lr;
    case JF_GRAD_NORM:
      *v = last ? last->grad_norm : 0;
      return last && last->has_grad_norm;
    case JF_WINDOW_MEAN:
      *v = last ? last->window_mean : 0;
      return last && last->has_window_mean;
    case JF_PEAK:
      *v = last ? last->peak : 0;
      return last && last->has_peak;
    case JF_IMAGES:
      *v = last ? last->images_per_sec : 0;
      return last && last->has_images_per_sec;
    case JF_RESTARTS:
      *v = job->restarts;
      return 1;
    case JF_CHECKPOINTS:
      *v = job->checkpoints;
      return 1;
    case JF_TEST_ACCURACY:
      *v = job->test_accuracy;
      return job->has_test_result && job->has_test_accuracy;
  }
  return 0;
}

/* One job's samples, family by family: family f's lines are text[off[f]] to text[off[f + 1]]. */
typedef struct {
  char id[64];
  int64_t finished_ms;
  char* text;
  size_t off[JF_N + 1];
} job_lines;

static int render_job(job_lines* out, const Job* job) {
  sbuf labels = {0}, b = {0};
  sb_append(&labels, "job=\"", 5);
  sb_label_value(&labels, job->id);
  sb_append(&labels, "\",name=\"", 8);
  sb_label_value(&labels, job->spec && job->spec->name ? job->spec->name : "");
  sb_append(&labels, "\"", 1);
  const Zenith__V1__StepMetrics* last = job->last;
  char state[32];
  state_label(job->state, state, sizeof state);

  for (int f = 0; f < JF_N && !labels.failed; f++) {
    out->off[f] = b.len;
    const char* name = job_families[f].name;
    double v;
    if (f == JF_STATE) {
      sb_sample(&b, name, labels.p, "state", state, 1);
    } else if (f == JF_SKIPPED) {
      sb_sample(&b, name, labels.p, "reason", "non_finite", last ? (double)last->skipped_steps : 0);
      sb_sample(&b, name, labels.p, "reason", "spike", last ? (double)last->spike_steps : 0);
    } else if (job_value(job, f, &v)) {
      sb_sample(&b, name, labels.p, NULL, NULL, v);
    }
  }
  out->off[JF_N] = b.len;
  int failed = labels.failed || b.failed;
  free(labels.p);
  if (failed) {
    free(b.p);
    return ZN_ERR_NOMEM;
  }
  snprintf(out->id, sizeof out->id, "%s", job->id);
  out->finished_ms = job->finished_unix_ms;
  out->text = b.p ? b.p : strdup("");
  return out->text ? ZN_OK : ZN_ERR_NOMEM;
}

/* Appends one more job_lines to an array, growing it; NULL when out of memory. */
static job_lines* push_lines(job_lines** v, size_t* n, size_t* cap) {
  if (*n == *cap) {
    size_t more = *cap ? 2 * *cap : 16;
    job_lines* p = realloc(*v, more * sizeof *p);
    if (!p) return NULL;
    *v = p;
    *cap = more;
  }
  return &(*v)[(*n)++];
}

/* ---------------------------------------------------------------- state */

struct coord_metrics {
  /* Shared with the HTTP thread: the last published page. */
  pthread_mutex_t lock;
  char* page;
  size_t page_len;

  /* The coordinator's thread only. */
  struct MHD_Daemon* httpd;
  char address[300];
  int port;
  zn_store* store;
  int workers[2][2]; /* [busy][0 cpu, 1 cuda] */
  job_lines* active; /* this snapshot's queued and running jobs */
  size_t n_active, cap_active;
  job_lines* recent; /* jobs that ended within RECENT_MS, oldest first */
  size_t n_recent, cap_recent;
  int64_t job_counts[MAX_STATES];
  uint64_t signature, counted_signature; /* of the active jobs' ids and states */
  int64_t counted_ms;
  int job_ended; /* since the last count */
};

/* Adds a finished job, replacing an older entry of the same job (one that was resumed). */
static void add_recent(coord_metrics* m, const Job* job) {
  for (size_t i = 0; i < m->n_recent; i++) {
    if (strcmp(m->recent[i].id, job->id) != 0) continue;
    free(m->recent[i].text);
    memmove(&m->recent[i], &m->recent[i + 1], (m->n_recent - i - 1) * sizeof *m->recent);
    m->n_recent--;
    break;
  }
  job_lines* slot = push_lines(&m->recent, &m->n_recent, &m->cap_recent);
  if (!slot) return;
  if (render_job(slot, job) != ZN_OK) m->n_recent--;
}

/* Forgets finished jobs older than an hour, and those that are active again (resumed). */
static void prune_recent(coord_metrics* m, int64_t now) {
  size_t kept = 0;
  for (size_t i = 0; i < m->n_recent; i++) {
    int drop = now - m->recent[i].finished_ms > RECENT_MS;
    for (size_t a = 0; a < m->n_active && !drop; a++)
      drop = strcmp(m->active[a].id, m->recent[i].id) == 0;
    if (drop)
      free(m->recent[i].text);
    else
      m->recent[kept++] = m->recent[i];
  }
  m->n_recent = kept;
}

static void count_jobs(coord_metrics* m, int64_t now) {
  int64_t counts[MAX_STATES];
  if (zn_store_count_jobs(m->store, counts, MAX_STATES) != ZN_OK) {
    ZN_WARN("metrics: counting jobs by state failed, zenith_jobs keeps its last values: %s",
            zn_store_errmsg(m->store));
  } else {
    memcpy(m->job_counts, counts, sizeof counts);
  }
  m->counted_ms = now;
  m->counted_signature = m->signature;
  m->job_ended = 0;
}

/* Seeds the finished jobs of the last hour, from before this coordinator started. */
static int load_recent(coord_metrics* m) {
  Job** jobs = NULL;
  size_t n = 0;
  if (zn_store_list_jobs(m->store, &jobs, &n) != ZN_OK) return ZN_ERR_STORE;
  int64_t since = zn_unix_ms() - RECENT_MS;
  for (size_t i = 0; i < n; i++) {
    int state = jobs[i]->state;
    int final = state == ZENITH__V1__JOB_STATE__SUCCEEDED ||
                state == ZENITH__V1__JOB_STATE__FAILED || state == ZENITH__V1__JOB_STATE__CANCELLED;
    if (final && jobs[i]->finished_unix_ms >= since) add_recent(m, jobs[i]);
  }
  zn_store_free_jobs(jobs, n);
  return ZN_OK;
}

/* ---------------------------------------------------------------- snapshots */

void coord_metrics_begin(coord_metrics* m) {
  memset(m->workers, 0, sizeof m->workers);
  for (size_t i = 0; i < m->n_active; i++) free(m->active[i].text);
  m->n_active = 0;
  m->signature = 14695981039346656037ull; /* FNV-1a offset basis */
}

void coord_metrics_add_worker(coord_metrics* m, const char* device, int busy) {
  int cuda = strcmp(device, "cuda") == 0;
  if (cuda || strcmp(device, "cpu") == 0) m->workers[busy ? 1 : 0][cuda]++;
}

void coord_metrics_add_job(coord_metrics* m, const Job* job) {
  for (const char* p = job->id;; p++) {
    m->signature = (m->signature ^ (uint8_t)*p) * 1099511628211ull; /* FNV-1a prime */
    if (!*p) break;
  }
  m->signature = (m->signature ^ (uint64_t)job->state) * 1099511628211ull;
  job_lines* slot = push_lines(&m->active, &m->n_active, &m->cap_active);
  if (slot && render_job(slot, job) != ZN_OK) m->n_active--;
}

void coord_metrics_job_ended(coord_metrics* m, const Job* job) {
  add_recent(m, job);
  m->job_ended = 1;
}

static void render_page(const coord_metrics* m, sbuf* b) {
  static const char* const devices[2] = {"cpu", "cuda"};
  sb_family(b, &workers_family);
  for (int busy = 0; busy < 2; busy++) {
    for (int d = 0; d < 2; d++) {
      char labels[64];
      snprintf(labels, sizeof labels, "state=\"%s\",device=\"%s\"", busy ? "busy" : "idle",
               devices[d]);
      sb_sample(b, workers_family.name, labels, NULL, NULL, m->workers[busy][d]);
    }
  }
  sb_family(b, &jobs_family);
  const ProtobufCEnumDescriptor* states = &zenith__v1__job_state__descriptor;
  for (unsigned i = 0; i < states->n_values; i++) {
    int state = states->values[i].value;
    if (state <= 0 || state >= MAX_STATES) continue;
    char name[32];
    state_label(state, name, sizeof name);
    sb_sample(b, jobs_family.name, "", "state", name, (double)m->job_counts[state]);
  }
  for (int f = 0; f < JF_N; f++) {
    sb_family(b, &job_families[f]);
    for (size_t i = 0; i < m->n_recent; i++) {
      const job_lines* j = &m->recent[i];
      sb_append(b, j->text + j->off[f], j->off[f + 1] - j->off[f]);
    }
    for (size_t i = 0; i < m->n_active; i++) {
      const job_lines* j = &m->active[i];
      sb_append(b, j->text + j->off[f], j->off[f + 1] - j->off[f]);
    }
  }
}

void coord_metrics_publish(coord_metrics* m) {
  int64_t now = zn_unix_ms();
  prune_recent(m, now);
  if (m->job_ended || m->signature != m->counted_signature || now - m->counted_ms >= RECOUNT_MS)
    count_jobs(m, now);

  sbuf b = {0};
  render_page(m, &b);
  if (b.failed) {
    ZN_WARN("metrics: out of memory rendering the page; scrapes get the previous one");
    free(b.p);
    return;
  }
  pthread_mutex_lock(&m->lock);
  char* old = m->page;
  m->page = b.p;
  m->page_len = b.len;
  pthread_mutex_unlock(&m->lock);
  free(old);
}

/* ---------------------------------------------------------------- HTTP */

static enum MHD_Result reply(struct MHD_Connection* c, unsigned status, const char* body) {
  struct MHD_Response* r =
      MHD_create_response_from_buffer(strlen(body), (void*)body, MHD_RESPMEM_PERSISTENT);
  if (!r) return MHD_NO;
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
  if (status == MHD_HTTP_METHOD_NOT_ALLOWED) MHD_add_response_header(r, "Allow", "GET, HEAD");
  enum MHD_Result rc = MHD_queue_response(c, status, r);
  MHD_destroy_response(r);
  return rc;
}

/* Runs on the server's thread: it touches nothing but the published page. */
static enum MHD_Result on_request(void* cls, struct MHD_Connection* c, const char* url,
                                  const char* method, const char* version, const char* upload_data,
                                  size_t* upload_data_size, void** req_cls) {
  coord_metrics* m = cls;
  if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
    return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed: use GET /metrics\n");
  if (strcmp(url, "/metrics") != 0)
    return reply(c, MHD_HTTP_NOT_FOUND, "not found: the metrics are at /metrics\n");

  pthread_mutex_lock(&m->lock);
  struct MHD_Response* r =
      m->page ? MHD_create_response_from_buffer(m->page_len, m->page, MHD_RESPMEM_MUST_COPY) : NULL;
  pthread_mutex_unlock(&m->lock);
  if (!r) return reply(c, MHD_HTTP_SERVICE_UNAVAILABLE, "no metrics yet\n");
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, PAGE_TYPE);
  enum MHD_Result rc = MHD_queue_response(c, MHD_HTTP_OK, r);
  MHD_destroy_response(r);
  return rc;
}

/* libmicrohttpd's own messages (mostly clients that went away) are for debugging only. */
static void log_httpd(void* cls, const char* fmt, va_list ap) {
  char text[512];
  vsnprintf(text, sizeof text, fmt, ap);
  text[strcspn(text, "\n")] = '\0';
  ZN_DEBUG("metrics endpoint: %s", text);
}

/* Splits "HOST:PORT", "[HOST]:PORT" or ":PORT" at the last colon; the port is 0 to 65535. */
static int split_address(const char* addr, char* host, size_t hostlen, char* port, size_t portlen) {
  const char* colon = strrchr(addr, ':');
  if (!colon) return -1;
  const char* h = addr;
  size_t hn = (size_t)(colon - addr);
  if (hn >= 2 && h[0] == '[' && h[hn - 1] == ']') {
    h++;
    hn -= 2;
  }
  const char* p = colon + 1;
  size_t pn = strlen(p);
  if (hn >= hostlen || pn == 0 || pn > 5 || pn >= portlen || strspn(p, "0123456789") != pn ||
      atol(p) > 65535)
    return -1;
  memcpy(host, h, hn);
  host[hn] = '\0';
  memcpy(port, p, pn + 1);
  return 0;
}

static int bind_one(const struct addrinfo* ai, int* err) {
  int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
  if (fd < 0) {
    *err = errno;
    return -1;
  }
  int on = 1, off = 0;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (ai->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
  if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0) {
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
  }
  *err = errno;
  close(fd);
  return -1;
}

/* A listening socket on the first of the host's addresses that binds. An empty host is every
 * interface: IPv6 first, which takes IPv4 too where the machine allows it. */
static int listen_on(const char* host, const char* port, char* why, size_t whylen) {
  struct addrinfo hints = {0};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  struct addrinfo* list = NULL;
  int gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &list);
  if (gai != 0) {
    snprintf(why, whylen, "%s", gai_strerror(gai));
    return -1;
  }
  int fd = -1, err = EADDRNOTAVAIL;
  for (int pass = 0; pass < 2 && fd < 0; pass++) {
    for (const struct addrinfo* ai = list; ai && fd < 0; ai = ai->ai_next) {
      int first = host[0] || ai->ai_family == AF_INET6;
      if (first == (pass == 0)) fd = bind_one(ai, &err);
    }
  }
  freeaddrinfo(list);
  if (fd < 0) snprintf(why, whylen, "%s", strerror(err));
  return fd;
}

/* "HOST:PORT" of the bound socket, with the port the kernel chose for port 0. */
static void bound_address(coord_metrics* m, int fd) {
  struct sockaddr_storage sa;
  socklen_t len = sizeof sa;
  char host[64] = "?", port[8] = "0";
  if (getsockname(fd, (struct sockaddr*)&sa, &len) == 0)
    getnameinfo((struct sockaddr*)&sa, len, host, sizeof host, port, sizeof port,
                NI_NUMERICHOST | NI_NUMERICSERV);
  int v6 = sa.ss_family == AF_INET6;
  snprintf(m->address, sizeof m->address, "%s%s%s:%s", v6 ? "[" : "", host, v6 ? "]" : "", port);
  m->port = atoi(port);
}

static struct MHD_Daemon* start_httpd(coord_metrics* m, int fd) {
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  struct MHD_Daemon* d =
      MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request,
                       m, MHD_OPTION_EXTERNAL_LOGGER, log_httpd, NULL, MHD_OPTION_LISTEN_SOCKET, fd,
                       MHD_OPTION_CONNECTION_LIMIT, (unsigned)32, MHD_OPTION_CONNECTION_TIMEOUT,
                       (unsigned)10, MHD_OPTION_END);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return d;
}

int coord_metrics_start(const char* addr, zn_store* store, coord_metrics** out, char* err,
                        size_t errlen) {
  *out = NULL;
  char host[256], port[8], why[256];
  if (split_address(addr, host, sizeof host, port, sizeof port) != 0) {
    snprintf(err, errlen, "cannot listen on '%s': expected HOST:PORT, [IPV6]:PORT or :PORT", addr);
    return ZN_ERR_INVALID;
  }
  int fd = listen_on(host, port, why, sizeof why);
  if (fd < 0) {
    snprintf(err, errlen, "cannot listen on %s: %s", addr, why);
    return ZN_ERR_IO;
  }

  coord_metrics* m = calloc(1, sizeof *m);
  if (!m) {
    close(fd);
    return ZN_ERR_NOMEM;
  }
  pthread_mutex_init(&m->lock, NULL);
  m->store = store;
  bound_address(m, fd);
  if (load_recent(m) != ZN_OK) {
    snprintf(err, errlen, "cannot read the finished jobs: %s", zn_store_errmsg(store));
    close(fd);
    coord_metrics_stop(m);
    return ZN_ERR_STORE;
  }
  coord_metrics_begin(m);
  coord_metrics_publish(m);
  m->httpd = start_httpd(m, fd);
  if (!m->httpd) {
    snprintf(err, errlen, "cannot serve on %s: libmicrohttpd did not start", m->address);
    if (fcntl(fd, F_GETFD) != -1) close(fd);
    coord_metrics_stop(m);
    return ZN_ERR_IO;
  }
  *out = m;
  return ZN_OK;
}

void coord_metrics_stop(coord_metrics* m) {
  if (!m) return;
  if (m->httpd) MHD_stop_daemon(m->httpd); /* joins its thread and closes the socket */
  coord_metrics_begin(m);
  for (size_t i = 0; i < m->n_recent; i++) free(m->recent[i].text);
  free(m->recent);
  free(m->active);
  free(m->page);
  pthread_mutex_destroy(&m->lock);
  free(m);
}

const char* coord_metrics_address(const coord_metrics* m) {
  return m->address;
}

int coord_metrics_port(const coord_metrics* m) {
  return m->port;
}
