/* zenithctl: the command-line client of a Zenith coordinator.
 *
 *   zenithctl [-v] [--coordinator ADDR] [--token T] [--ca FILE] [--insecure] COMMAND ...
 *   zenithctl [--coordinator ADDR] submit [spec flags] [--watch]
 *   zenithctl [--coordinator ADDR] list|status JOB|watch JOB|cancel JOB [--json]
 *   zenithctl [--coordinator ADDR] history JOB [--format csv|json] [-o FILE]
 *   zenithctl [--coordinator ADDR] plot JOB -o FILE.svg|FILE.png
 *   zenithctl [--coordinator ADDR] checkpoint JOB | checkpoints JOB [--json]
 *   zenithctl [--coordinator ADDR] resume JOB [--from CKPT] [--workers N] [--sharding MODE]
 *
 * Each command is one RPC (watch, history, plot: one stream). Errors print the coordinator's
 * own message, which names the field or job at fault, and exit non-zero. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "ctl_config.h"
#include "zn_log.h"

static const char* usage_text =
    "usage: zenithctl [-v] [--coordinator ADDR] [--token TOKEN] [--ca FILE] [--insecure]\n"
    "                 [--cert FILE --key FILE]\n"
    "                 COMMAND [flags]\n"
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
    "  resume JOB [--from CHECKPOINT] [--workers N] [--sharding none|optimizer]\n"
    "                      queue a failed or cancelled job again from a checkpoint (its latest),\n"
    "                      on N workers and with that sharding from now on (default: as before)\n"
    "  history JOB [--format csv|json] [-o FILE]\n"
    "                      every step's loss, n_t, m_t, M_t and eta_t (JSON: also evaluations\n"
    "                      and events)\n"
    "  plot JOB -o FILE    draw eta_t and n_t, m_t, M_t over the steps (FILE .svg or .png)\n"
    "\n"
    "Each setting comes from its flag, else the environment (ZENITH_COORDINATOR,\n"
    "ZENITH_TOKEN, ZENITH_CA, ZENITH_INSECURE=1), else the config file ($ZENITH_CONFIG or\n"
    "~/.config/zenith/config: `coordinator = ADDR`, `token = T`, `ca = FILE`, `insecure = 1`).\n"
    "The coordinator defaults to 127.0.0.1:7070. With no ca and no insecure, a loopback\n"
    "coordinator is reached in plain text and any other over TLS with the system's roots.\n"
    "--cert FILE and --key FILE (ZENITH_CERT, ZENITH_KEY; cert, key) send a client certificate,\n"
    "for a coordinator that requires one and has no token.\n"
    "-v prints where each setting came from (never the token).\n"
    "`zenithctl submit --help` lists the job flags.\n";

/* Reads "--name VALUE" or "--name=VALUE" at argv[*i]; 1 when it matched. */
static int take_value(int argc, char** argv, int* i, const char* name, const char** out) {
  size_t len = strlen(name);
  if (strncmp(argv[*i], name, len) != 0) return 0;
  if (argv[*i][len] == '=') {
    *out = argv[*i] + len + 1;
    return 1;
  }
  if (argv[*i][len] != '\0' || *i + 1 >= argc) return 0;
  *out = argv[++*i];
  return 1;
}

/* The flags before the command; returns the command's index, or -1 after
 * printing usage (*exit_code set). */
static int parse_globals(int argc, char** argv, ctl_flags* g, int* verbose, int* exit_code) {
  int i = 1;
  for (; i < argc && argv[i][0] == '-'; i++) {
    if (take_value(argc, argv, &i, "--coordinator", &g->coordinator) ||
        take_value(argc, argv, &i, "--token", &g->token) ||
        take_value(argc, argv, &i, "--ca", &g->ca) ||
        take_value(argc, argv, &i, "--cert", &g->cert) ||
        take_value(argc, argv, &i, "--key", &g->key)) {
      continue;
    } else if (strcmp(argv[i], "--insecure") == 0) {
      g->insecure = 1;
    } else if (strcmp(argv[i], "-v") == 0 || strcmp(argv[i], "--verbose") == 0) {
      *verbose = 1;
    } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
      fputs(usage_text, stdout);
      *exit_code = 0;
      return -1;
    } else {
      fprintf(stderr, "zenithctl: unknown flag '%s'\n\n%s", argv[i], usage_text);
      *exit_code = 2;
      return -1;
    }
  }
  if (i >= argc) {
    fputs(usage_text, stderr);
    *exit_code = 2;
    return -1;
  }
  return i;
}

static int run_command(const ctl_args* args);

int main(int argc, char** argv) {
  zn_log_set_role("zenithctl");
  ctl_flags g = {0};
  int exit_code = 0;
  int verbose = 0;
  int i = parse_globals(argc, argv, &g, &verbose, &exit_code);
  if (i < 0) return exit_code;

  ctl_config config;
  exit_code = ctl_config_resolve(&config, &g);
  if (exit_code == 0) {
    if (verbose) ctl_config_describe(&config);
    ctl_args args = {config.coordinator.value, argc - i, argv + i, &config.rpc};
    exit_code = run_command(&args);
  }
  ctl_config_free(&config);
  return exit_code;
}

static int run_command(const ctl_args* args) {
  const char* command = args->argv[0];
  if (strcmp(command, "submit") == 0) return ctl_submit(args);
  if (strcmp(command, "list") == 0) return ctl_list(args);
  if (strcmp(command, "status") == 0) return ctl_status(args);
  if (strcmp(command, "watch") == 0) return ctl_watch(args);
  if (strcmp(command, "cancel") == 0) return ctl_cancel(args);
  if (strcmp(command, "checkpoint") == 0) return ctl_checkpoint(args);
  if (strcmp(command, "checkpoints") == 0) return ctl_checkpoints(args);
  if (strcmp(command, "resume") == 0) return ctl_resume(args);
  if (strcmp(command, "history") == 0) return ctl_history(args);
  if (strcmp(command, "plot") == 0) return ctl_plot(args);
  fprintf(stderr, "zenithctl: unknown command '%s'\n\n%s", command, usage_text);
  return 2;
}
