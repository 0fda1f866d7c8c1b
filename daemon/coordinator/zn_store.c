/* The coordinator's store over SQLite; see zn_store.h for what it keeps.
 *
 * Rows hold packed protobufs: a job is one BLOB plus the few columns we select
 * or order by, and a history item is one BLOB plus its kind (the
 * WatchJobResponse item case), so the proto can grow without a schema change.
 * History is one table with an AUTOINCREMENT sequence, which gives replay the
 * exact interleaving of events, metrics and evals in which they were appended.
 *
 * Durability. The journal is a write-ahead log: a commit is one sequential
 * append to zenith.db-wal, and a transaction cut short by a kill -9 leaves a
 * tail without a commit record that the next open discards, so readers see
 * whole batches or nothing. synchronous=FULL rather than NORMAL: in WAL mode
 * NORMAL does not fsync at commit, which is safe against a kill -9 (the kernel
 * still holds the written pages) but lets a power loss or kernel crash drop the
 * last commits, and those include SubmitJob replies already sent and job ids
 * already handed out. FULL costs one fsync of the log per transaction, and we
 * make it one transaction per metrics report, not per row.
 *
 * The file is opened in exclusive locking mode: the coordinator is its only
 * user, and a second coordinator started on the same folder then fails at open
 * instead of handing out the same job ids. */
#define _POSIX_C_SOURCE 200809L /* mkdir, access, PATH_MAX under -std=c11 */
#include "zn_store.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include "zn_err.h"

#define STORE_FILE "zenith.db"
/* Decimal, because the schema text below is built from these by the preprocessor. */
#define STORE_APP_ID 1515082824 /* 0x5A4E5448, "ZNTH": marks our files in the SQLite header */
#define STORE_SCHEMA_VERSION 2  /* 2 added the checkpoints table */
#define STR_(x) #x
#define STR(x) STR_(x)
#define STORE_BUSY_MS 500 /* lets a coordinator that is exiting release the file */

enum {
  ST_NEXT_ID,
  ST_NEXT_WORKER,
  ST_PUT_JOB,
  ST_GET_JOB,
  ST_LIST_JOBS,
  ST_APPEND,
  ST_REPLAY,
  ST_COUNT,
  ST_ADD_CKPT,
  ST_LIST_CKPT,
  ST_REMOVE_CKPT,
  ST_BEGIN,
  ST_COMMIT,
  ST_ROLLBACK,
  ST_N
};

static const char* const stmt_sql[ST_N] = {
    [ST_NEXT_ID] = "UPDATE meta SET value = value + 1 WHERE key = 'last_job_id' RETURNING value",
    /* Worker ids came later than the schema's first version: the row is made on first use. */
    [ST_NEXT_WORKER] = "INSERT INTO meta VALUES ('last_worker_id', 1) ON CONFLICT (key) "
                       "DO UPDATE SET value = value + 1 RETURNING value",
    /* An upsert, not INSERT OR REPLACE: REPLACE deletes the row and inserts a
     * new one, which would move a job to the end of the listing. */
    [ST_PUT_JOB] =
        "INSERT INTO jobs (id, state, created_unix_ms, job) VALUES (?1, ?2, ?3, ?4) "
        "ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
        "created_unix_ms = excluded.created_unix_ms, job = excluded.job",
    [ST_GET_JOB] = "SELECT job FROM jobs WHERE id = ?1",
    [ST_LIST_JOBS] = "SELECT id, job FROM jobs ORDER BY seq",
    [ST_APPEND] = "INSERT INTO history (job_id, kind, body) VALUES (?1, ?2, ?3)",
    [ST_REPLAY] = "SELECT seq, kind, body FROM history WHERE job_id = ?1 ORDER BY seq",
    [ST_COUNT] = "SELECT count(*) FROM history WHERE job_id = ?1",
    [ST_ADD_CKPT] = "INSERT INTO checkpoints (id, job_id, step, body) VALUES (?1, ?2, ?3, ?4)",
    [ST_LIST_CKPT] =
        "SELECT id, body FROM checkpoints WHERE job_id = ?1 AND removed = 0 "
        "ORDER BY seq",
    [ST_REMOVE_CKPT] = "UPDATE checkpoints SET removed = 1 WHERE id = ?1",
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
};

/* Checkpoint records: a packed Checkpoint per row. Rows of removed files stay, marked, so an id
 * is never reused and the history's "checkpoint" events keep pointing at a known record. */
#define CHECKPOINTS_SQL                      \
  "CREATE TABLE checkpoints ("               \
  "  seq INTEGER PRIMARY KEY AUTOINCREMENT," \
  "  id TEXT NOT NULL UNIQUE,"               \
  "  job_id TEXT NOT NULL,"                  \
  "  step INTEGER NOT NULL,"                 \
  "  removed INTEGER NOT NULL DEFAULT 0,"    \
  "  body BLOB NOT NULL);"                   \
  "CREATE INDEX checkpoints_job ON checkpoints (job_id, seq);"

/* Version 1 databases lack only the checkpoints table. */
static const char migrate_1_to_2_sql[] = "BEGIN;" CHECKPOINTS_SQL
                                         "PRAGMA user_version = 2;"
                                         "COMMIT;";

static const char schema_sql[] =
    "BEGIN;"
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
    "INSERT INTO meta VALUES ('last_job_id', 0);"
    "CREATE TABLE jobs ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  id TEXT NOT NULL UNIQUE,"
    "  state INTEGER NOT NULL,"
    "  created_unix_ms INTEGER NOT NULL,"
    "  job BLOB NOT NULL);"
    "CREATE INDEX jobs_state ON jobs (state);"
    "CREATE INDEX jobs_created ON jobs (created_unix_ms);"
    "CREATE TABLE history ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  job_id TEXT NOT NULL,"
    "  kind INTEGER NOT NULL,"
    "  body BLOB NOT NULL);"
    "CREATE INDEX history_job ON history (job_id, seq);" CHECKPOINTS_SQL
    "PRAGMA application_id = " STR(STORE_APP_ID) ";"
    "PRAGMA user_version = " STR(STORE_SCHEMA_VERSION) ";"
    "COMMIT;";

struct zn_store {
  sqlite3* db;
  char path[PATH_MAX];
  sqlite3_stmt* st[ST_N];
  uint8_t* buf; /* packing scratch, grown as needed */
  size_t cap;
  int replaying;
  char err[PATH_MAX + 256];
};

static int set_err(zn_store* s, int code, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int set_err(zn_store* s, int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(s->err, sizeof s->err, fmt, ap);
  va_end(ap);
  return code;
}

/* Records a SQLite failure of `op` on the file. */
static int db_err(zn_store* s, const char* op) {
  int code = sqlite3_errcode(s->db);
  set_err(s, 0, "%s: %s: %s (sqlite error %d)", s->path, op, sqlite3_errmsg(s->db),
          sqlite3_extended_errcode(s->db));
  return code == SQLITE_NOMEM ? ZN_ERR_NOMEM : ZN_ERR_STORE;
}

/* Readies a statement for its next use. Bindings are cleared because blobs are
 * bound without a copy from the scratch buffer, which may move. */
static void stmt_done(sqlite3_stmt* st) {
  sqlite3_reset(st);
  sqlite3_clear_bindings(st);
}

static int run_simple(zn_store* s, int which, const char* op) {
  int rc = sqlite3_step(s->st[which]) == SQLITE_DONE ? ZN_OK : db_err(s, op);
  stmt_done(s->st[which]);
  return rc;
}

static int pack(zn_store* s, const ProtobufCMessage* m, size_t* len) {
  size_t need = protobuf_c_message_get_packed_size(m);
  if (need > s->cap) {
    uint8_t* p = realloc(s->buf, need);
    if (!p) return set_err(s, ZN_ERR_NOMEM, "packing a %zu-byte message: out of memory", need);
    s->buf = p;
    s->cap = need;
  }
  *len = protobuf_c_message_pack(m, s->buf);
  return ZN_OK;
}

/* ---------------------------------------------------------------- open */

/* mkdir -p: creates each missing folder on the way to dir. */
static int make_dirs(zn_store* s, const char* dir) {
  char tmp[PATH_MAX];
  if (snprintf(tmp, sizeof tmp, "%s", dir) >= (int)sizeof tmp)
    return set_err(s, ZN_ERR_INVALID, "store folder path too long: %s", dir);

  for (char* p = tmp + 1;; p++) {
    if (*p != '/' && *p != '\0') continue;
    char c = *p;
    *p = '\0';
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
      return set_err(s, ZN_ERR_IO, "cannot create store folder %s: %s", tmp, strerror(errno));
    *p = c;
    if (c == '\0') break;
  }

  struct stat st;
  if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
    return set_err(s, ZN_ERR_IO, "store folder %s is not a folder", dir);
  /* SQLite creates zenith.db-wal next to the database, so the folder itself
   * must be writable, not just the file. */
  if (access(dir, W_OK | X_OK) != 0)
    return set_err(s, ZN_ERR_IO, "store folder %s is not writable: %s", dir, strerror(errno));
  return ZN_OK;
}

/* Reads one integer PRAGMA; the first read is also where SQLite first looks at
 * the file, so a garbage file fails here. */
static int read_pragma(zn_store* s, const char* sql, int64_t* v) {
  sqlite3_stmt* st = NULL;
  int rc = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) *v = sqlite3_column_int64(st, 0);
  int out = rc == SQLITE_ROW ? ZN_OK : rc;
  sqlite3_finalize(st);
  return out;
}

static int not_ours(zn_store* s, int rc) {
  if (rc == SQLITE_BUSY || rc == SQLITE_LOCKED)
    return set_err(s, ZN_ERR_STORE,
                   "%s is in use by another process (a second coordinator on the same folder?)",
                   s->path);
  if (rc == SQLITE_NOTADB || rc == SQLITE_CORRUPT)
    return set_err(s, ZN_ERR_STORE, "%s is not a Zenith database: %s", s->path,
                   sqlite3_errmsg(s->db));
  return set_err(s, ZN_ERR_STORE, "cannot read %s: %s (sqlite error %d)", s->path,
                 sqlite3_errmsg(s->db), rc);
}

/* Accepts our own file at our schema version, creates the schema in an empty
 * file, and refuses anything else without writing to it. */
static int check_schema(zn_store* s) {
  int64_t app_id = 0, version = 0, tables = 0;
  int rc = read_pragma(s, "PRAGMA application_id", &app_id);
  if (rc == ZN_OK) rc = read_pragma(s, "PRAGMA user_version", &version);
  if (rc == ZN_OK) rc = read_pragma(s, "SELECT count(*) FROM sqlite_schema", &tables);
  if (rc != ZN_OK) return not_ours(s, rc);

  if (app_id == 0 && tables == 0) {
    if (sqlite3_exec(s->db, schema_sql, NULL, NULL, NULL) != SQLITE_OK) {
      int out = db_err(s, "creating the schema");
      sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
      return out;
    }
    return ZN_OK;
  }
  if (app_id != STORE_APP_ID)
    return set_err(s, ZN_ERR_STORE,
                   "%s is not a Zenith database: an SQLite file with application_id 0x%" PRIx64
                   " and %" PRId64 " tables",
                   s->path, (uint64_t)app_id, tables);
  if (version == 1) {
    if (sqlite3_exec(s->db, migrate_1_to_2_sql, NULL, NULL, NULL) != SQLITE_OK) {
      int out = db_err(s, "adding the checkpoints table to a version 1 database");
      sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
      return out;
    }
    return ZN_OK;
  }
  if (version != STORE_SCHEMA_VERSION)
    return set_err(s, ZN_ERR_STORE,
                   "%s has schema version %" PRId64 ", this build reads version %d", s->path,
                   version, STORE_SCHEMA_VERSION);
  return ZN_OK;
}

static int set_durability(zn_store* s) {
  sqlite3_stmt* st = NULL;
  int rc = sqlite3_prepare_v2(s->db, "PRAGMA journal_mode = WAL", -1, &st, NULL);
  if (rc == SQLITE_OK) rc = sqlite3_step(st);
  const char* mode = rc == SQLITE_ROW ? (const char*)sqlite3_column_text(st, 0) : NULL;
  int ok = mode && strcmp(mode, "wal") == 0;
  sqlite3_finalize(st);
  if (rc != SQLITE_ROW) return not_ours(s, rc);
  if (!ok) return set_err(s, ZN_ERR_STORE, "%s: cannot switch to WAL journal mode", s->path);

  if (sqlite3_exec(s->db, "PRAGMA synchronous = FULL", NULL, NULL, NULL) != SQLITE_OK)
    return db_err(s, "setting synchronous = FULL");
  return ZN_OK;
}

/* Takes the exclusive lock now rather than at the first job, so that a second
 * coordinator fails at open. */
static int take_lock(zn_store* s) {
  int rc = sqlite3_exec(s->db, "BEGIN IMMEDIATE; COMMIT", NULL, NULL, NULL);
  if (rc != SQLITE_OK) {
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    return not_ours(s, rc);
  }
  return ZN_OK;
}

static int prepare_all(zn_store* s) {
  for (int i = 0; i < ST_N; i++) {
    if (sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL) !=
        SQLITE_OK)
      return db_err(s, stmt_sql[i]);
  }
  return ZN_OK;
}

static int open_db(zn_store* s, const char* dir) {
  if (snprintf(s->path, sizeof s->path, "%s/%s", dir, STORE_FILE) >= (int)sizeof s->path)
    return set_err(s, ZN_ERR_INVALID, "store folder path too long: %s", dir);

  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
  if (sqlite3_open_v2(s->path, &s->db, flags, NULL) != SQLITE_OK) {
    if (!s->db) return set_err(s, ZN_ERR_NOMEM, "%s: cannot allocate a connection", s->path);
    return set_err(s, ZN_ERR_STORE, "cannot open %s: %s", s->path, sqlite3_errmsg(s->db));
  }
  sqlite3_busy_timeout(s->db, STORE_BUSY_MS);

  /* Exclusive before the first read: in that mode the WAL index lives in
   * process memory, and the locks taken by the first read and write are held
   * until close. */
  if (sqlite3_exec(s->db, "PRAGMA locking_mode = EXCLUSIVE", NULL, NULL, NULL) != SQLITE_OK)
    return db_err(s, "setting exclusive locking");
  return ZN_OK;
}

int zn_store_open(const char* dir, zn_store** out, char* err, size_t errlen) {
  *out = NULL;
  zn_store* s = calloc(1, sizeof *s);
  if (!s) {
    if (errlen) snprintf(err, errlen, "opening the store: out of memory");
    return ZN_ERR_NOMEM;
  }

  int rc = ZN_OK;
  if (!dir || !*dir) rc = set_err(s, ZN_ERR_INVALID, "no store folder given");
  if (rc == ZN_OK) rc = make_dirs(s, dir);
  if (rc == ZN_OK) rc = open_db(s, dir);
  if (rc == ZN_OK) rc = check_schema(s); /* before anything writes to a file that is not ours */
  if (rc == ZN_OK) rc = set_durability(s);
  if (rc == ZN_OK) rc = take_lock(s);
  if (rc == ZN_OK) rc = prepare_all(s);
  if (rc != ZN_OK) goto fail;

  *out = s;
  return ZN_OK;

fail:
  if (errlen) snprintf(err, errlen, "%s", s->err);
  zn_store_close(s);
  return rc;
}

void zn_store_close(zn_store* s) {
  if (!s) return;
  for (int i = 0; i < ST_N; i++) sqlite3_finalize(s->st[i]);
  /* Closing the last connection checkpoints the log into zenith.db and
   * removes zenith.db-wal. */
  sqlite3_close(s->db);
  free(s->buf);
  free(s);
}

const char* zn_store_errmsg(const zn_store* s) {
  return s ? s->err : "no store";
}

/* ---------------------------------------------------------------- jobs */

/* Steps a counter statement that increments and returns the new value, into "PREFIX-N". */
static int next_id(zn_store* s, int which, const char* prefix, char* id, size_t len) {
  sqlite3_stmt* st = s->st[which];
  int64_t n = 0;
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) {
    n = sqlite3_column_int64(st, 0);
    rc = sqlite3_step(st); /* to SQLITE_DONE, which commits the increment */
  }
  int out = rc == SQLITE_DONE ? ZN_OK : db_err(s, "new id");
  stmt_done(st);
  if (out != ZN_OK) return out;

  if (snprintf(id, len, "%s-%" PRId64, prefix, n) >= (int)len)
    return set_err(s, ZN_ERR_INVALID, "new id: %s-%" PRId64 " does not fit %zu bytes", prefix, n,
                   len);
  return ZN_OK;
}

int zn_store_new_job_id(zn_store* s, char* id, size_t len) {
  return next_id(s, ST_NEXT_ID, "j", id, len);
}

int zn_store_new_worker_id(zn_store* s, char* id, size_t len) {
  return next_id(s, ST_NEXT_WORKER, "w", id, len);
}

int zn_store_put_job(zn_store* s, const Zenith__V1__Job* job) {
  if (!job || !job->id || !*job->id)
    return set_err(s, ZN_ERR_INVALID, "put_job: the job has no id");

  size_t len = 0;
  int rc = pack(s, &job->base, &len);
  if (rc != ZN_OK) return rc;

  sqlite3_stmt* st = s->st[ST_PUT_JOB];
  sqlite3_bind_text(st, 1, job->id, -1, SQLITE_STATIC);
  sqlite3_bind_int(st, 2, job->has_state ? (int)job->state : 0);
  sqlite3_bind_int64(st, 3, job->has_created_unix_ms ? job->created_unix_ms : 0);
  sqlite3_bind_blob(st, 4, s->buf, (int)len, SQLITE_STATIC);
  rc = sqlite3_step(st) == SQLITE_DONE ? ZN_OK : db_err(s, "put_job");
  stmt_done(st);
  return rc;
}

/* Unpacks a stored Job, naming the row when its blob is damaged. */
static int unpack_job(zn_store* s, sqlite3_stmt* st, int col, const char* id,
                      Zenith__V1__Job** out) {
  const uint8_t* data = sqlite3_column_blob(st, col);
  size_t len = (size_t)sqlite3_column_bytes(st, col);
  *out = zenith__v1__job__unpack(NULL, len, data ? data : (const uint8_t*)"");
  if (!*out)
    return set_err(s, ZN_ERR_STORE, "%s: job %s: the stored %zu-byte Job does not unpack", s->path,
                   id, len);
  return ZN_OK;
}

int zn_store_get_job(zn_store* s, const char* id, Zenith__V1__Job** out) {
  *out = NULL;
  sqlite3_stmt* st = s->st[ST_GET_JOB];
  sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  int out_rc;
  if (rc == SQLITE_ROW)
    out_rc = unpack_job(s, st, 0, id, out);
  else if (rc == SQLITE_DONE)
    out_rc = set_err(s, ZN_ERR_NOT_FOUND, "get_job: no job %s", id);
  else
    out_rc = db_err(s, "get_job");
  stmt_done(st);
  return out_rc;
}

int zn_store_list_jobs(zn_store* s, Zenith__V1__Job*** jobs, size_t* n) {
  *jobs = NULL;
  *n = 0;
  sqlite3_stmt* st = s->st[ST_LIST_JOBS];
  Zenith__V1__Job** v = NULL;
  size_t count = 0, cap = 0;
  int rc = ZN_OK, step;

  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    if (count == cap) {
      size_t ncap = cap ? 2 * cap : 16;
      Zenith__V1__Job** nv = realloc(v, ncap * sizeof *nv);
      if (!nv) {
        rc = set_err(s, ZN_ERR_NOMEM, "list_jobs: out of memory at %zu jobs", count);
        goto done;
      }
      v = nv;
      cap = ncap;
    }
    /* One damaged row must not hide every other job, nor stop a restart. */
    if (unpack_job(s, st, 1, (const char*)sqlite3_column_text(st, 0), &v[count]) != ZN_OK) {
      ZN_ERROR("%s; that job is left out of the list", zn_store_errmsg(s));
      continue;
    }
    count++;
  }
  if (step != SQLITE_DONE) rc = db_err(s, "list_jobs");

done:
  stmt_done(st);
  if (rc != ZN_OK) {
    zn_store_free_jobs(v, count);
    return rc;
  }
  *jobs = v;
  *n = count;
  return ZN_OK;
}

void zn_store_free_jobs(Zenith__V1__Job** jobs, size_t n) {
  for (size_t i = 0; i < n; i++) zenith__v1__job__free_unpacked(jobs[i], NULL);
  free(jobs);
}

/* Prepared per call rather than kept with the others: the metrics endpoint asks when a job
 * changes state, not per step. The state index makes it a scan of the index alone. */
int zn_store_count_jobs(zn_store* s, int64_t* counts, size_t n) {
  memset(counts, 0, n * sizeof *counts);
  const char* sql = "SELECT state, count(*) FROM jobs GROUP BY state";
  sqlite3_stmt* st = NULL;
  if (sqlite3_prepare_v2(s->db, sql, -1, &st, NULL) != SQLITE_OK) return db_err(s, "count_jobs");
  int step;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    int64_t state = sqlite3_column_int64(st, 0);
    if (state >= 0 && (uint64_t)state < n) counts[state] = sqlite3_column_int64(st, 1);
  }
  int rc = step == SQLITE_DONE ? ZN_OK : db_err(s, "count_jobs");
  sqlite3_finalize(st);
  return rc;
}

/* ---------------------------------------------------------------- history */

static int insert_item(zn_store* s, const char* job_id, int kind, const ProtobufCMessage* m,
                       const char* op) {
  size_t len = 0;
  int rc = pack(s, m, &len);
  if (rc != ZN_OK) return rc;

  sqlite3_stmt* st = s->st[ST_APPEND];
  sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
  sqlite3_bind_int(st, 2, kind);
  /* A zero-length blob bound from a NULL pointer would be stored as NULL and
   * break NOT NULL; an empty message packs to zero bytes. */
  sqlite3_bind_blob(st, 3, len ? (const void*)s->buf : "", (int)len, SQLITE_STATIC);
  rc = sqlite3_step(st) == SQLITE_DONE ? ZN_OK : db_err(s, op);
  stmt_done(st);
  return rc;
}

int zn_store_append_metrics(zn_store* s, const char* job_id, Zenith__V1__StepMetrics* const* m,
                            size_t n) {
  if (!job_id) return set_err(s, ZN_ERR_INVALID, "append_metrics: no job id");
  if (n == 0) return ZN_OK;

  int rc = run_simple(s, ST_BEGIN, "append_metrics: begin");
  if (rc != ZN_OK) return rc;
  for (size_t i = 0; i < n && rc == ZN_OK; i++)
    rc = insert_item(s, job_id, ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS, &m[i]->base,
                     "append_metrics");
  if (rc == ZN_OK) rc = run_simple(s, ST_COMMIT, "append_metrics: commit");
  if (rc != ZN_OK && !sqlite3_get_autocommit(s->db)) {
    /* Keep the first failure's text: the rollback's own can only be vaguer. */
    sqlite3_step(s->st[ST_ROLLBACK]);
    stmt_done(s->st[ST_ROLLBACK]);
  }
  return rc;
}

int zn_store_append_eval(zn_store* s, const char* job_id, const Zenith__V1__EvalResult* e) {
  if (!job_id || !e) return set_err(s, ZN_ERR_INVALID, "append_eval: no job id or eval");
  return insert_item(s, job_id, ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL, &e->base, "append_eval");
}

int zn_store_append_event(zn_store* s, const char* job_id, const Zenith__V1__JobEvent* e) {
  if (!job_id || !e) return set_err(s, ZN_ERR_INVALID, "append_event: no job id or event");
  return insert_item(s, job_id, ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT, &e->base,
                     "append_event");
}

static const ProtobufCMessageDescriptor* item_descriptor(int kind) {
  switch (kind) {
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS:
      return &zenith__v1__step_metrics__descriptor;
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL:
      return &zenith__v1__eval_result__descriptor;
    case ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVENT:
      return &zenith__v1__job_event__descriptor;
    default:
      return NULL;
  }
}

/* Unpacks the current replay row and hands it to the callback. */
static int deliver(zn_store* s, sqlite3_stmt* st, const char* job_id, zn_history_fn fn, void* ud) {
  int64_t seq = sqlite3_column_int64(st, 0);
  int kind = sqlite3_column_int(st, 1);
  const uint8_t* data = sqlite3_column_blob(st, 2);
  size_t len = (size_t)sqlite3_column_bytes(st, 2);

  const ProtobufCMessageDescriptor* d = item_descriptor(kind);
  ProtobufCMessage* m =
      d ? protobuf_c_message_unpack(d, NULL, len, data ? data : (const uint8_t*)"") : NULL;
  if (!m) { /* skip it: the rest of the history is still worth showing */
    ZN_ERROR("%s: replay %s: history row %" PRId64 " (kind %d) is damaged and skipped", s->path,
             job_id, seq, kind);
    return ZN_OK;
  }

  Zenith__V1__WatchJobResponse item = ZENITH__V1__WATCH_JOB_RESPONSE__INIT;
  item.item_case = (Zenith__V1__WatchJobResponse__ItemCase)kind;
  if (kind == ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_METRICS)
    item.metrics = (Zenith__V1__StepMetrics*)m;
  else if (kind == ZENITH__V1__WATCH_JOB_RESPONSE__ITEM_EVAL)
    item.eval = (Zenith__V1__EvalResult*)m;
  else
    item.event = (Zenith__V1__JobEvent*)m;
  int stop = fn(ud, &item);
  protobuf_c_message_free_unpacked(m, NULL);
  if (stop) return set_err(s, ZN_ERR_CANCELLED, "replay %s: stopped by the caller", job_id);
  return ZN_OK;
}

int zn_store_replay(zn_store* s, const char* job_id, zn_history_fn fn, void* ud) {
  /* The replay statement is busy until the loop ends; a nested replay would
   * reset it under the outer one. */
  if (s->replaying)
    return set_err(s, ZN_ERR_INVALID, "replay %s: called from a replay callback", job_id);

  sqlite3_stmt* st = s->st[ST_REPLAY];
  sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
  s->replaying = 1;
  int rc = ZN_OK, step;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    rc = deliver(s, st, job_id, fn, ud);
    if (rc != ZN_OK) break;
  }
  if (rc == ZN_OK && step != SQLITE_DONE) rc = db_err(s, "replay");
  stmt_done(st);
  s->replaying = 0;
  return rc;
}

int zn_store_history_count(zn_store* s, const char* job_id, int64_t* n) {
  sqlite3_stmt* st = s->st[ST_COUNT];
  sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st);
  if (rc == SQLITE_ROW) *n = sqlite3_column_int64(st, 0);
  int out = rc == SQLITE_ROW ? ZN_OK : db_err(s, "history_count");
  stmt_done(st);
  return out;
}

/* ---------------------------------------------------------------- checkpoints */

int zn_store_add_checkpoint(zn_store* s, const Zenith__V1__Checkpoint* c) {
  if (!c || !c->id || !c->job_id) return set_err(s, ZN_ERR_INVALID, "add_checkpoint: no id");
  size_t len = 0;
  int rc = pack(s, &c->base, &len);
  if (rc != ZN_OK) return rc;
  sqlite3_stmt* st = s->st[ST_ADD_CKPT];
  sqlite3_bind_text(st, 1, c->id, -1, SQLITE_STATIC);
  sqlite3_bind_text(st, 2, c->job_id, -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 3, c->step);
  sqlite3_bind_blob(st, 4, len ? (const void*)s->buf : "", (int)len, SQLITE_STATIC);
  rc = sqlite3_step(st) == SQLITE_DONE ? ZN_OK : db_err(s, "add_checkpoint");
  stmt_done(st);
  return rc;
}

int zn_store_list_checkpoints(zn_store* s, const char* job_id, Zenith__V1__Checkpoint*** out,
                              size_t* n) {
  *out = NULL;
  *n = 0;
  sqlite3_stmt* st = s->st[ST_LIST_CKPT];
  sqlite3_bind_text(st, 1, job_id, -1, SQLITE_STATIC);
  size_t cap = 0;
  int rc = ZN_OK, step;
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    const uint8_t* data = sqlite3_column_blob(st, 1);
    size_t len = (size_t)sqlite3_column_bytes(st, 1);
    Zenith__V1__Checkpoint* c =
        zenith__v1__checkpoint__unpack(NULL, len, data ? data : (const uint8_t*)"");
    if (!c) { /* as for history rows: one damaged record does not hide the others */
      ZN_ERROR("%s: checkpoint record %s of job %s is damaged and skipped", s->path,
               (const char*)sqlite3_column_text(st, 0), job_id);
      continue;
    }
    if (*n == cap) {
      cap = cap ? 2 * cap : 8;
      *out = realloc(*out, cap * sizeof **out);
    }
    (*out)[(*n)++] = c;
  }
  if (step != SQLITE_DONE) rc = db_err(s, "list_checkpoints");
  stmt_done(st);
  if (rc != ZN_OK) {
    zn_store_free_checkpoints(*out, *n);
    *out = NULL;
    *n = 0;
  }
  return rc;
}

void zn_store_free_checkpoints(Zenith__V1__Checkpoint** c, size_t n) {
  for (size_t i = 0; i < n; i++) zenith__v1__checkpoint__free_unpacked(c[i], NULL);
  free(c);
}

int zn_store_remove_checkpoint(zn_store* s, const char* id) {
  sqlite3_stmt* st = s->st[ST_REMOVE_CKPT];
  sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
  int rc = sqlite3_step(st) == SQLITE_DONE ? ZN_OK : db_err(s, "remove_checkpoint");
  stmt_done(st);
  return rc;
}
