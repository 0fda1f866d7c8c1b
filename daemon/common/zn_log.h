/* Leveled logging for the daemons and the client.
 *
 * One line per event: "2026-12-03T16:40:01.123Z INFO  coordinator job=j-3 rank=0 message".
 * ZN_LOG tests the level before it evaluates its arguments, so a debug line in
 * a hot path costs one comparison when debug logging is off. The role, job and
 * rank prefixes are per thread: a trainer thread sets its job and rank once. */
#ifndef ZN_LOG_H
#define ZN_LOG_H

typedef enum { ZN_LOG_DEBUG = 0, ZN_LOG_INFO, ZN_LOG_WARN, ZN_LOG_ERROR } zn_log_level;

extern zn_log_level zn_log_threshold;

/* Sets the process role shown on every line ("coordinator", "worker", "zenithctl"). */
void zn_log_set_role(const char* role);
/* Parses "debug", "info", "warn" or "error"; returns 0 on success. */
int zn_log_set_level_name(const char* name);
/* Sets this thread's job and rank prefix; job NULL clears it. */
void zn_log_set_context(const char* job, int rank);

void zn_log_write(zn_log_level level, const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define ZN_LOG(level, ...)                                                                   \
  do {                                                                                       \
    if ((level) >= zn_log_threshold) zn_log_write((level), __FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

#define ZN_DEBUG(...) ZN_LOG(ZN_LOG_DEBUG, __VA_ARGS__)
#define ZN_INFO(...) ZN_LOG(ZN_LOG_INFO, __VA_ARGS__)
#define ZN_WARN(...) ZN_LOG(ZN_LOG_WARN, __VA_ARGS__)
#define ZN_ERROR(...) ZN_LOG(ZN_LOG_ERROR, __VA_ARGS__)

#endif
