/* Leveled, timestamped log lines on stderr; see zn_log.h. Lines are written
 * with one fputs of a fully formatted buffer, so lines from threads never mix. */
#include "zn_log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

zn_log_level zn_log_threshold = ZN_LOG_INFO;

static char log_role[32] = "zenith";
static _Thread_local char thread_job[64];
static _Thread_local int thread_rank = -1;

static const char* level_names[] = {"DEBUG", "INFO ", "WARN ", "ERROR"};

void zn_log_set_role(const char* role) {
  snprintf(log_role, sizeof log_role, "%s", role);
}

int zn_log_set_level_name(const char* name) {
  static const char* names[] = {"debug", "info", "warn", "error"};
  for (int i = 0; i < 4; i++) {
    if (strcasecmp(name, names[i]) == 0) {
      zn_log_threshold = (zn_log_level)i;
      return 0;
    }
  }
  return -1;
}

void zn_log_set_context(const char* job, int rank) {
  snprintf(thread_job, sizeof thread_job, "%s", job ? job : "");
  thread_rank = job ? rank : -1;
}

void zn_log_write(zn_log_level level, const char* file, int line, const char* fmt, ...) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);

  char buf[2048];
  int n = (int)strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  n += snprintf(buf + n, sizeof buf - n, ".%03dZ %s %s", (int)(tv.tv_usec / 1000),
                level_names[level], log_role);
  if (thread_job[0]) n += snprintf(buf + n, sizeof buf - n, " job=%s", thread_job);
  if (thread_rank >= 0) n += snprintf(buf + n, sizeof buf - n, " rank=%d", thread_rank);
  if (level == ZN_LOG_DEBUG) {
    const char* base = strrchr(file, '/');
    n += snprintf(buf + n, sizeof buf - n, " (%s:%d)", base ? base + 1 : file, line);
  }
  if (n < (int)sizeof buf - 1) buf[n++] = ' ';

  va_list ap;
  va_start(ap, fmt);
  if (n < (int)sizeof buf) vsnprintf(buf + n, sizeof buf - n, fmt, ap);
  va_end(ap);

  size_t len = strlen(buf);
  if (len > sizeof buf - 2) len = sizeof buf - 2;
  buf[len] = '\n';
  buf[len + 1] = '\0';
  fputs(buf, stderr);
}
