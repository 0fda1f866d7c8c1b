/* zenithctl submit, list, status and cancel, and the JSON form of a job. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ctl.h"
#include "zn_err.h"

zn_rpc_channel* ctl_open_channel(const ctl_args* a) {
  return zn_rpc_channel_open_with(a->coordinator, 0, a->rpc);
}

ProtobufCMessage* ctl_call(const ctl_args* a, const char* method, const ProtobufCMessage* req,
                           const ProtobufCMessageDescriptor* resp_type) {
  zn_rpc_channel* ch = ctl_open_channel(a);
  ProtobufCMessage* resp = NULL;
  zn_rpc_status st;
  if (zn_rpc_unary(ch, method, req, resp_type, CTL_TIMEOUT_MS, &resp, &st) != ZN_OK) {
    ctl_print_rpc_error(a, &st);
    resp = NULL;
  }
  zn_rpc_channel_close(ch);
  return resp;
}

void ctl_print_rpc_error(const ctl_args* a, const zn_rpc_status* st) {
  if (st->code == ZN_RPC_UNAVAILABLE)
    fprintf(stderr,
            "zenithctl: cannot reach the coordinator at %s (%s); is it running? "
            "Set it with --coordinator or ZENITH_COORDINATOR\n",
            a->coordinator, st->message);
  else
    fprintf(stderr, "zenithctl: %s: %s\n", zn_rpc_code_name(st->code), st->message);
}

const char* ctl_state_name(int state) {
  const ProtobufCEnumValue* v =
      protobuf_c_enum_descriptor_get_value(&zenith__v1__job_state__descriptor, state);
  return v ? v->name : "UNKNOWN";
}

/* ---------------------------------------------------------------- submit */

static const char* submit_help =
    "usage: zenithctl submit [flags]\n"
    "  --model NAME          mlp or cnn (required)\n"
    "  --dataset NAME        fashion-mnist (default)\n"
    "  --data-dir DIR        folder of IDX files (default /usr/share/datasets/fashion-mnist)\n"
    "  --workers N           worker daemons to train on (1)\n"
    "  --batch-size N        global batch, divisible by --workers (128)\n"
    "  --epochs N            epochs to train (give --epochs, --max-steps or both)\n"
    "  --max-steps N         stop after N optimizer steps\n"
    "  --seed N              initialisation and data order (0)\n"
    "  --eval-every N        also evaluate on the test set every N steps (default: at the end)\n"
    "  --threads N           compute threads per worker (the worker's own setting)\n"
    "  --device NAME         cpu or cuda: run on workers started with that device (cpu)\n"
    "  --no-cuda-graph       cuda jobs: launch each step's kernels instead of replaying a CUDA\n"
    "                        graph of the step (graphs are on by default)\n"
    "  --sharding MODE       none, or optimizer: each worker keeps the momentum of its own shard\n"
    "                        of the parameters only (ZeRO stage 1; cpu jobs) (none)\n"
    "  --name TEXT           a label for the job, shown by status\n"
    "  --watch               follow the job after submitting it\n"
    "Checkpoints and restarts:\n"
    "  --checkpoint-every K  write a checkpoint every K steps; 0 = only on request and at the\n"
    "                        end (500)\n"
    "  --keep-checkpoints N  keep the newest N checkpoints, delete older ones (3)\n"
    "  --max-restarts N      restart from the latest checkpoint after losing a worker, at most\n"
    "                        N times; a worker preempted by SIGTERM does not count (3)\n"
    "ZENITH optimizer:\n"
    "  --lr0 X               initial and largest learning rate (0.05)\n"
    "  --window N            gradient norms in the sliding window (100)\n"
    "  --momentum X          heavy-ball momentum in [0, 1) (0.9)\n"
    "  --nesterov            Nesterov momentum\n"
    "  --weight-decay X      L2 coefficient added to the gradient (5e-4)\n"
    "  --decoupled-decay X   decay applied to the weights directly (0)\n"
    "  --lr-min X            floor on the learning rate (0)\n"
    "  --spike-factor X      skip norms above X times the peak; 0 = off (0)\n";

enum {
  S_MODEL = 1,
  S_DATASET,
  S_DATA_DIR,
  S_WORKERS,
  S_BATCH,
  S_EPOCHS,
  S_MAX_STEPS,
  S_SEED,
  S_EVAL,
  S_THREADS,
  S_DEVICE,
  S_NO_GRAPH,
  S_SHARDING,
  S_NAME,
  S_LR0,
  S_WINDOW,
  S_MOMENTUM,
  S_NESTEROV,
  S_WD,
  S_DD,
  S_LR_MIN,
  S_SPIKE,
  S_CKPT_EVERY,
  S_KEEP_CKPTS,
  S_MAX_RESTARTS,
  S_WATCH,
  S_HELP
};

static const struct option submit_options[] = {
    {"model", required_argument, 0, S_MODEL},
    {"dataset", required_argument, 0, S_DATASET},
    {"data-dir", required_argument, 0, S_DATA_DIR},
    {"workers", required_argument, 0, S_WORKERS},
    {"batch-size", required_argument, 0, S_BATCH},
    {"epochs", required_argument, 0, S_EPOCHS},
    {"max-steps", required_argument, 0, S_MAX_STEPS},
    {"seed", required_argument, 0, S_SEED},
    {"eval-every", required_argument, 0, S_EVAL},
    {"threads", required_argument, 0, S_THREADS},
    {"device", required_argument, 0, S_DEVICE},
    {"no-cuda-graph", no_argument, 0, S_NO_GRAPH},
    {"sharding", required_argument, 0, S_SHARDING},
    {"name", required_argument, 0, S_NAME},
    {"lr0", required_argument, 0, S_LR0},
    {"window", required_argument, 0, S_WINDOW},
    {"momentum", required_argument, 0, S_MOMENTUM},
    {"nesterov", no_argument, 0, S_NESTEROV},
    {"weight-decay", required_argument, 0, S_WD},
    {"decoupled-decay", required_argument, 0, S_DD},
    {"lr-min", required_argument, 0, S_LR_MIN},
    {"spike-factor", required_argument, 0, S_SPIKE},
    {"checkpoint-every", required_argument, 0, S_CKPT_EVERY},
    {"keep-checkpoints", required_argument, 0, S_KEEP_CKPTS},
    {"max-restarts", required_argument, 0, S_MAX_RESTARTS},
    {"watch", no_argument, 0, S_WATCH},
    {"help", no_argument, 0, S_HELP},
    {0, 0, 0, 0}};

static int parse_i64(int opt, const char* text, long long* out) {
  char* end;
  errno = 0;
  *out = strtoll(text, &end, 10);
  if (*text && !*end && errno == 0) return 0;
  fprintf(stderr, "zenithctl submit: --%s expects a whole number, got '%s'\n",
          submit_options[opt - 1].name, text);
  return -1;
}

static int parse_int(int opt, const char* text, int32_t* out) {
  long long v;
  if (parse_i64(opt, text, &v) != 0) return -1;
  if (v < INT32_MIN || v > INT32_MAX) {
    fprintf(stderr, "zenithctl submit: --%s: %s is out of range\n", submit_options[opt - 1].name,
            text);
    return -1;
  }
  *out = (int32_t)v;
  return 0;
}

static int parse_double(int opt, const char* text, double* out) {
  char* end;
  errno = 0;
  *out = strtod(text, &end);
  if (*text && !*end && errno == 0) return 0;
  fprintf(stderr, "zenithctl submit: --%s expects a number, got '%s'\n",
          submit_options[opt - 1].name, text);
  return -1;
}

static int parse_optimizer_flag(int opt, const char* arg, Zenith__V1__ZenithParams* p) {
  switch (opt) {
    case S_LR0:
      p->has_lr0 = 1;
      return parse_double(opt, arg, &p->lr0);
    case S_WINDOW:
      p->has_window = 1;
      return parse_int(opt, arg, &p->window);
    case S_MOMENTUM:
      p->has_momentum = 1;
      return parse_double(opt, arg, &p->momentum);
    case S_NESTEROV:
      p->has_nesterov = p->nesterov = 1;
      return 0;
    case S_WD:
      p->has_weight_decay = 1;
      return parse_double(opt, arg, &p->weight_decay);
    case S_DD:
      p->has_decoupled_decay = 1;
      return parse_double(opt, arg, &p->decoupled_decay);
    case S_LR_MIN:
      p->has_lr_min = 1;
      return parse_double(opt, arg, &p->lr_min);
    case S_SPIKE:
      p->has_spike_factor = 1;
      return parse_double(opt, arg, &p->spike_factor);
  }
  return -1;
}

/* A job asks for a kind of device; which GPU a worker uses is the worker's own --device. */
static int parse_device(char* arg, char** out) {
  if (strcmp(arg, "cpu") != 0 && strcmp(arg, "cuda") != 0) {
    fprintf(stderr,
            "zenithctl submit: --device expects cpu or cuda, got '%s' (a worker's own --device "
            "cuda:N picks its GPU)\n",
            arg);
    return -1;
  }
  *out = arg;
  return 0;
}

int ctl_check_sharding(const char* command, const char* arg) {
  if (strcmp(arg, "none") == 0 || strcmp(arg, "optimizer") == 0) return 0;
  fprintf(stderr, "zenithctl %s: --sharding expects none or optimizer, got '%s'\n", command, arg);
  return -1;
}

static int parse_spec_flag(int opt, char* arg, Zenith__V1__JobSpec* s) {
  long long v;
  switch (opt) {
    case S_MODEL:
      s->model = arg;
      return 0;
    case S_DATASET:
      s->dataset = arg;
      return 0;
    case S_DATA_DIR:
      s->data_dir = arg;
      return 0;
    case S_NAME:
      s->name = arg;
      return 0;
    case S_DEVICE:
      return parse_device(arg, &s->device);
    case S_SHARDING:
      s->sharding = arg;
      return ctl_check_sharding("submit", arg);
    case S_NO_GRAPH:
      s->has_cuda_graph = 1;
      s->cuda_graph = 0;
      return 0;
    case S_WORKERS:
      s->has_workers = 1;
      return parse_int(opt, arg, &s->workers);
    case S_BATCH:
      s->has_batch_size = 1;
      return parse_int(opt, arg, &s->batch_size);
    case S_EPOCHS:
      s->has_epochs = 1;
      return parse_int(opt, arg, &s->epochs);
    case S_EVAL:
      s->has_eval_every = 1;
      return parse_int(opt, arg, &s->eval_every);
    case S_THREADS:
      s->has_threads = 1;
      return parse_int(opt, arg, &s->threads);
    case S_CKPT_EVERY:
      s->has_checkpoint_every = 1;
      return parse_int(opt, arg, &s->checkpoint_every);
    case S_KEEP_CKPTS:
      s->has_keep_checkpoints = 1;
      return parse_int(opt, arg, &s->keep_checkpoints);
    case S_MAX_RESTARTS:
      s->has_max_restarts = 1;
      return parse_int(opt, arg, &s->max_restarts);
    case S_MAX_STEPS:
      s->has_max_steps = 1;
      return parse_i64(opt, arg, (long long*)&s->max_steps);
    case S_SEED:
      s->has_seed = 1;
      if (parse_i64(opt, arg, &v) != 0) return -1;
      s->seed = (uint64_t)v;
      return 0;
  }
  return parse_optimizer_flag(opt, arg, s->optimizer);
}

int ctl_submit(const ctl_args* a) {
  Zenith__V1__JobSpec spec = ZENITH__V1__JOB_SPEC__INIT;
  Zenith__V1__ZenithParams params = ZENITH__V1__ZENITH_PARAMS__INIT;
  spec.optimizer = &params;
  int watch = 0, opt;
  optind = 1;
  opterr = 0;
  while ((opt = getopt_long(a->argc, a->argv, "", submit_options, NULL)) != -1) {
    if (opt == '?') {
      fprintf(stderr,
              "zenithctl submit: unknown flag or missing value: '%s'; "
              "`zenithctl submit --help` lists the flags\n",
              a->argv[optind - 1]);
      return 2;
    }
    if (opt == S_HELP) {
      fputs(submit_help, stdout);
      return 0;
    }
    if (opt == S_WATCH)
      watch = 1;
    else if (parse_spec_flag(opt, optarg, &spec) != 0)
      return 2;
  }
  if (optind < a->argc) {
    fprintf(stderr, "zenithctl submit: unexpected argument '%s'\n", a->argv[optind]);
    return 2;
  }

  if (!spec.model) {
    fprintf(stderr, "zenithctl submit: --model is required (mlp or cnn)\n");
    return 2;
  }
  Zenith__V1__SubmitJobRequest req = ZENITH__V1__SUBMIT_JOB_REQUEST__INIT;
  req.spec = &spec;
  Zenith__V1__SubmitJobResponse* resp = (void*)ctl_call(
      a, "/zenith.v1.Zenith/SubmitJob", &req.base, &zenith__v1__submit_job_response__descriptor);
  if (!resp) return 1;
  char id[64];
  snprintf(id, sizeof id, "%s", resp->job->id);
  printf("%s\n", id);
  fflush(stdout);
  protobuf_c_message_free_unpacked(&resp->base, NULL);
  return watch ? ctl_watch_job(a, id) : 0;
}

/* ---------------------------------------------------------------- JSON */

static json_t* json_time(int64_t unix_ms) {
  if (unix_ms <= 0) return json_null();
  char buf[32];
  time_t sec = (time_t)(unix_ms / 1000);
  struct tm tm;
  gmtime_r(&sec, &tm);
  strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return json_string(buf);
}

static json_t* json_number(double v) {
  return isfinite(v) ? json_real(v) : json_null();
}

/* A spec's device; "cpu" when unset, as in jobs stored before specs had one. */
static const char* spec_device(const Zenith__V1__JobSpec* s) {
  return s->device && s->device[0] ? s->device : "cpu";
}

const char* ctl_spec_sharding(const Zenith__V1__JobSpec* s) {
  return s->sharding && s->sharding[0] ? s->sharding : "none";
}

static json_t* spec_json(const Zenith__V1__JobSpec* s) {
  const Zenith__V1__ZenithParams* p = s->optimizer;
  json_t* opt = json_object();
  if (p) {
    json_object_set_new(opt, "lr0", json_real(p->lr0));
    json_object_set_new(opt, "window", json_integer(p->window));
    json_object_set_new(opt, "momentum", json_real(p->momentum));
    json_object_set_new(opt, "nesterov", json_boolean(p->nesterov));
    json_object_set_new(opt, "weight_decay", json_real(p->weight_decay));
    json_object_set_new(opt, "decoupled_decay", json_real(p->decoupled_decay));
    json_object_set_new(opt, "lr_min", json_real(p->lr_min));
    json_object_set_new(opt, "spike_factor", json_real(p->spike_factor));
  }
  json_t* o = json_pack(
      "{s:s, s:s, s:s, s:s, s:s, s:b, s:i, s:i, s:i, s:I, s:I, s:i, s:i, s:o}", "name",
      s->name ? s->name : "", "model", s->model ? s->model : "", "dataset",
      s->dataset ? s->dataset : "", "data_dir", s->data_dir ? s->data_dir : "", "device",
      spec_device(s), "cuda_graph", s->cuda_graph, "workers", s->workers, "batch_size",
      s->batch_size, "epochs", s->epochs, "max_steps", (json_int_t)s->max_steps, "seed",
      (json_int_t)s->seed, "eval_every", s->eval_every, "threads", s->threads, "optimizer", opt);
  json_object_set_new(o, "checkpoint_every", json_integer(s->checkpoint_every));
  json_object_set_new(o, "keep_checkpoints", json_integer(s->keep_checkpoints));
  json_object_set_new(o, "max_restarts", json_integer(s->max_restarts));
  json_object_set_new(o, "sharding", json_string(ctl_spec_sharding(s)));
  return o;
}

json_t* ctl_job_json(const Zenith__V1__Job* j) {
  json_t* o = json_object();
  json_object_set_new(o, "id", json_string(j->id));
  json_object_set_new(o, "state", json_string(ctl_state_name(j->state)));
  json_object_set_new(o, "step", json_integer(j->step));
  json_object_set_new(o, "total_steps", json_integer(j->total_steps));
  json_object_set_new(o, "epoch", json_integer(j->epoch));
  json_object_set_new(o, "test_accuracy",
                      j->has_test_result ? json_number(j->test_accuracy) : json_null());
  json_object_set_new(o, "test_loss", j->has_test_result ? json_number(j->test_loss) : json_null());
  json_object_set_new(o, "error", j->error && j->error[0] ? json_string(j->error) : json_null());
  json_object_set_new(o, "reason", json_string(j->reason ? j->reason : ""));
  json_t* workers = json_array();
  for (size_t i = 0; i < j->n_workers; i++)
    json_array_append_new(workers, json_string(j->workers[i]));
  json_object_set_new(o, "workers", workers);
  json_object_set_new(o, "created", json_time(j->created_unix_ms));
  json_object_set_new(o, "started", json_time(j->started_unix_ms));
  json_object_set_new(o, "finished", json_time(j->finished_unix_ms));
  if (j->last) {
    json_object_set_new(o, "loss", json_number(j->last->loss));
    json_object_set_new(o, "lr", json_number(j->last->lr));
    json_object_set_new(o, "grad_norm", json_number(j->last->grad_norm));
    json_object_set_new(o, "skipped_steps", json_integer(j->last->skipped_steps));
  }
  json_object_set_new(o, "restarts", json_integer(j->restarts));
  json_object_set_new(o, "checkpoints", json_integer(j->checkpoints));
  json_object_set_new(o, "latest_checkpoint",
                      j->latest_checkpoint && j->latest_checkpoint->id
                          ? ctl_checkpoint_json(j->latest_checkpoint)
                          : json_null());
  if (j->spec) json_object_set_new(o, "spec", spec_json(j->spec));
  return o;
}

void ctl_print_job_json(const Zenith__V1__Job* job) {
  json_t* o = ctl_job_json(job);
  json_dumpf(o, stdout,
             JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(CTL_REAL_DIGITS));
  fputc('\n', stdout);
  json_decref(o);
}

/* ---------------------------------------------------------------- list, status, cancel */

static int wants_json(const ctl_args* a, const char** positional, int max_positional) {
  int n = 0;
  int json = 0;
  for (int i = 1; i < a->argc; i++) {
    if (strcmp(a->argv[i], "--json") == 0) {
      json = 1;
    } else if (a->argv[i][0] == '-' || n == max_positional) {
      fprintf(stderr, "zenithctl %s: unexpected argument '%s'\n", a->argv[0], a->argv[i]);
      return -1;
    } else {
      positional[n++] = a->argv[i];
    }
  }
  if (n < max_positional) {
    fprintf(stderr, "zenithctl %s: give the job id, e.g. `zenithctl %s j-1`\n", a->argv[0],
            a->argv[0]);
    return -1;
  }
  return json;
}

/* One row of `zenithctl list`; every column left-aligned under its header. */
static void print_list_row(const Zenith__V1__Job* j) {
  char step[40], accuracy[16];
  if (j->total_steps > 0)
    snprintf(step, sizeof step, "%lld/%lld", (long long)j->step, (long long)j->total_steps);
  else
    snprintf(step, sizeof step, "%lld/?", (long long)j->step);
  if (j->has_test_result)
    snprintf(accuracy, sizeof accuracy, "%.2f%%", 100 * j->test_accuracy);
  else
    snprintf(accuracy, sizeof accuracy, "-");
  const char* note = j->error && j->error[0] ? j->error : (j->reason ? j->reason : "");
  printf("%-8s %-10s %-6s %-6s %-15s %-9s %s\n", j->id, ctl_state_name(j->state),
         j->spec ? j->spec->model : "", j->spec ? spec_device(j->spec) : "", step, accuracy, note);
}

int ctl_list(const ctl_args* a) {
  const char* none[1];
  int json = wants_json(a, none, 0);
  if (json < 0) return 2;
  Zenith__V1__ListJobsRequest req = ZENITH__V1__LIST_JOBS_REQUEST__INIT;
  Zenith__V1__ListJobsResponse* resp = (void*)ctl_call(a, "/zenith.v1.Zenith/ListJobs", &req.base,
                                                       &zenith__v1__list_jobs_response__descriptor);
  if (!resp) return 1;
  if (json) {
    json_t* arr = json_array();
    for (size_t i = 0; i < resp->n_jobs; i++)
      json_array_append_new(arr, ctl_job_json(resp->jobs[i]));
    json_dumpf(arr, stdout,
               JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(CTL_REAL_DIGITS));
    fputc('\n', stdout);
    json_decref(arr);
  } else {
    printf("%-8s %-10s %-6s %-6s %-15s %-9s %s\n", "ID", "STATE", "MODEL", "DEVICE", "STEP",
           "TEST ACC", "NOTE");
    for (size_t i = 0; i < resp->n_jobs; i++) print_list_row(resp->jobs[i]);
  }
  protobuf_c_message_free_unpacked(&resp->base, NULL);
  return 0;
}

static void print_job_text(const Zenith__V1__Job* j) {
  printf("id:            %s\n", j->id);
  printf("state:         %s%s%s\n", ctl_state_name(j->state),
         j->reason && j->reason[0] ? " - " : "", j->reason ? j->reason : "");
  if (j->spec)
    printf("model:         %s on %s, %d worker(s), batch %d\n", j->spec->model, j->spec->dataset,
           j->spec->workers, j->spec->batch_size);
  if (j->spec) printf("device:        %s\n", spec_device(j->spec));
  if (j->spec && strcmp(ctl_spec_sharding(j->spec), "optimizer") == 0)
    printf("sharding:      optimizer (each worker keeps the momentum of its shard)\n");
  else if (j->spec)
    printf("sharding:      %s\n", ctl_spec_sharding(j->spec));
  if (j->spec && j->spec->name && j->spec->name[0]) printf("name:          %s\n", j->spec->name);
  if (j->total_steps > 0)
    printf("step:          %lld of %lld (epoch %d)\n", (long long)j->step,
           (long long)j->total_steps, j->epoch);
  else
    printf("step:          %lld (total known once a worker has loaded the data)\n",
           (long long)j->step);
  if (j->last)
    printf("last step:     loss %.4f, lr %.6f, grad norm %.4f, window mean %.4f, peak %.4f\n",
           j->last->loss, j->last->lr, j->last->grad_norm, j->last->window_mean, j->last->peak);
  if (j->has_test_result)
    printf("test:          accuracy %.2f%%, loss %.4f\n", 100 * j->test_accuracy, j->test_loss);
  if (j->n_workers) {
    printf("workers:      ");
    for (size_t i = 0; i < j->n_workers; i++) printf(" %s", j->workers[i]);
    printf("\n");
  }
  ctl_print_job_checkpoints(j);
  if (j->error && j->error[0]) printf("error:         %s\n", j->error);
}

int ctl_status(const ctl_args* a) {
  const char* id[1];
  int json = wants_json(a, id, 1);
  if (json < 0) return 2;
  Zenith__V1__GetJobRequest req = ZENITH__V1__GET_JOB_REQUEST__INIT;
  req.id = (char*)id[0];
  Zenith__V1__Job* job =
      (void*)ctl_call(a, "/zenith.v1.Zenith/GetJob", &req.base, &zenith__v1__job__descriptor);
  if (!job) return 1;
  if (json)
    ctl_print_job_json(job);
  else
    print_job_text(job);
  protobuf_c_message_free_unpacked(&job->base, NULL);
  return 0;
}

int ctl_cancel(const ctl_args* a) {
  const char* id[1];
  if (wants_json(a, id, 1) < 0) return 2;
  Zenith__V1__CancelJobRequest req = ZENITH__V1__CANCEL_JOB_REQUEST__INIT;
  req.id = (char*)id[0];
  Zenith__V1__Job* job =
      (void*)ctl_call(a, "/zenith.v1.Zenith/CancelJob", &req.base, &zenith__v1__job__descriptor);
  if (!job) return 1;
  printf("%s %s\n", job->id, ctl_state_name(job->state));
  protobuf_c_message_free_unpacked(&job->base, NULL);
  return 0;
}

int ctl_watch(const ctl_args* a) {
  const char* id[1];
  if (wants_json(a, id, 1) < 0) return 2;
  return ctl_watch_job(a, id[0]);
}
