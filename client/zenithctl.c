/* zenithctl: the command-line client of a Zenith coordinator.
 *
 *   zenithctl [--coordinator ADDR] submit [spec flags] [--watch]
 *   zenithctl [--coordinator ADDR] list|status JOB|watch JOB|cancel JOB [--json]
 *   zenithctl [--coordinator ADDR] history JOB [--format csv|json] [-o FILE]
 *   zenithctl [--coordinator ADDR] plot JOB -o FILE.svg|FILE.png
 *   zenithctl [--coordinator ADDR] checkpoint JOB | checkpoints JOB [--json] | resume JOB
 *
 * Each command is one RPC (watch, history, plot: one stream). Errors print the coordinator's
 * own message, which names the field or job at fault, and exit non-zero. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "zn_log.h"

static const char* usage_text =
    "usage: zenithctl [--coordinator ADDR] COMMAND [flags]\n"
    "\n"
    "commands:\n"
    "  submit [flags]      submit a training job; prints its id (--watch to follow it)\n"
    "  list [--json]       list jobs\n"
    "  status JOB [--json] show one job\n"
    "  watch JOB           follow a job live; exits 0 when it succeeds\n"
    "  cancel JOB          cancel a queued or running job\n"
    "  checkpoint JOB [--timeout S]\n"
    "                      ask a running job for a checkpoint; waits until it is written\n"
    "  checkpoints JOB [--json]\n"
    "                      list a job's checkpoints, oldest first\n"
    "  resume JOB [--from CHECKPOINT]\n"
    "                      queue a failed or cancelled job again from a checkpoint (its latest)\n"
    "  history JOB [--format csv|json] [-o FILE]\n"
    "                      every step's loss, n_t, m_t, M_t and eta_t (JSON: also evaluations\n"
    "                      and events)\n"
    "  plot JOB -o FILE    draw eta_t and n_t, m_t, M_t over the steps (FILE .svg or .png)\n"
    "\n"
    "The coordinator is --coordinator ADDR, else $ZENITH_COORDINATOR, else 127.0.0.1:7070.\n"
    "`zenithctl submit --help` lists the job flags.\n";

int main(int argc, char** argv) {
  zn_log_set_role("zenithctl");
  const char* coordinator = getenv("ZENITH_COORDINATOR");
  if (!coordinator || !coordinator[0]) coordinator = "127.0.0.1:7070";

  int i = 1;
  for (; i < argc && argv[i][0] == '-'; i++) {
    if (strcmp(argv[i], "--coordinator") == 0 && i + 1 < argc) {
      coordinator = argv[++i];
    } else if (strncmp(argv[i], "--coordinator=", 14) == 0) {
      coordinator = argv[i] + 14;
    } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(usage_text, stdout);
      return 0;
    } else {
      fprintf(stderr, "zenithctl: unknown flag '%s'\n\n%s", argv[i], usage_text);
      return 2;
    }
  }
  if (i >= argc) {
    fputs(usage_text, stderr);
    return 2;
  }

  const char* command = argv[i];
  ctl_args args = {coordinator, argc - i, argv + i};
  if (strcmp(command, "submit") == 0) return ctl_submit(&args);
  if (strcmp(command, "list") == 0) return ctl_list(&args);
  if (strcmp(command, "status") == 0) return ctl_status(&args);
  if (strcmp(command, "watch") == 0) return ctl_watch(&args);
  if (strcmp(command, "cancel") == 0) return ctl_cancel(&args);
  if (strcmp(command, "checkpoint") == 0) return ctl_checkpoint(&args);
  if (strcmp(command, "checkpoints") == 0) return ctl_checkpoints(&args);
  if (strcmp(command, "resume") == 0) return ctl_resume(&args);
  if (strcmp(command, "history") == 0) return ctl_history(&args);
  if (strcmp(command, "plot") == 0) return ctl_plot(&args);
  fprintf(stderr, "zenithctl: unknown command '%s'\n\n%s", command, usage_text);
  return 2;
}
