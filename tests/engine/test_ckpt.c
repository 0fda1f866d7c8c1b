/* Tests of the checkpoint files (daemon/worker/zn_ckpt.c): tensors of every dtype and shape come
 * back bit for bit, metadata too; the digest is the SHA-256 this test computes itself over the
 * file with the digest zeroed; a flipped byte anywhere, a cut at any point, an empty or a missing
 * file are refused with a message that names the file and the fault; and a write that fails, at
 * any step, leaves the checkpoint already at its path readable and no temporary file behind.
 * Every test works in a fresh folder under TMPDIR (default /tmp), removed afterwards. */
#define _XOPEN_SOURCE 700

#include <dirent.h>
#include <fcntl.h>
#include <float.h>
#include <ftw.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>
#include <openssl/evp.h>

#include "zn_ckpt.h"
#include "zn_err.h"

#define ZEROS64 "0000000000000000000000000000000000000000000000000000000000000000"
/* How every Zenith header starts: the digest first, where the reader looks for it. */
#define HEADER_START "{\"__metadata__\":{\"zenith.sha256\":\"" ZEROS64 "\"}"
#define NOBODY 65534

/* ---- the folder each test works in ---- */

static int make_folder(void** state) {
  const char* tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
  size_t len = strlen(tmp) + 32;
  char* dir = malloc(len);
  if (!dir) return -1;
  snprintf(dir, len, "%s/zn-ckpt-XXXXXX", tmp);
  if (!mkdtemp(dir)) {
    free(dir);
    return -1;
  }
  *state = dir;
  return 0;
}

static int remove_entry(const char* path, const struct stat* st, int type, struct FTW* ftw) {
  if (type == FTW_DP) chmod(path, 0700);
  return remove(path);
}

static int remove_folder(void** state) {
  char* dir = *state;
  chmod(dir, 0700);
  int rc = nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
  free(dir);
  return rc;
}

static const char* in_folder(void** state, const char* name, char* buf, size_t len) {
  snprintf(buf, len, "%s/%s", (const char*)*state, name);
  return buf;
}

/* Files in the folder whose name holds ".tmp.": temporary files a write left behind. */
static int temp_files_in(const char* dir) {
  DIR* d = opendir(dir);
  assert_non_null(d);
  int n = 0;
  for (struct dirent* de; (de = readdir(d));) n += strstr(de->d_name, ".tmp.") != NULL;
  closedir(d);
  return n;
}

/* ---- the sample checkpoint: every dtype, a scalar, an empty tensor, 4 dimensions, and an F64
 * that follows an odd number of F32s, so it does not lie 8-byte aligned in the file ---- */

typedef struct {
  float w[6];
  double v[5];
  int64_t k[8];
  float odd[3];
  double after_odd[2];
  double scalar;
  int64_t deep[3];
  zn_ckpt_tensor t[8]; /* the tensors over the arrays above */
  int n;
} sample;

static void name_tensors(sample* s) {
  zn_ckpt_tensor* t = s->t;
  t[0] = (zn_ckpt_tensor){"weights", ZN_CKPT_F32, 2, {2, 3}, s->w};
  t[1] = (zn_ckpt_tensor){"velocity", ZN_CKPT_F64, 1, {5}, s->v};
  t[2] = (zn_ckpt_tensor){"counts", ZN_CKPT_I64, 3, {2, 2, 2}, s->k};
  t[3] = (zn_ckpt_tensor){"empty", ZN_CKPT_F32, 2, {0, 4}, NULL};
  t[4] = (zn_ckpt_tensor){"odd", ZN_CKPT_F32, 1, {3}, s->odd};
  t[5] = (zn_ckpt_tensor){"after_odd", ZN_CKPT_F64, 1, {2}, s->after_odd};
  t[6] = (zn_ckpt_tensor){"scalar", ZN_CKPT_F64, 0, {0}, &s->scalar};
  t[7] = (zn_ckpt_tensor){"deep/é", ZN_CKPT_I64, 4, {1, 1, 1, 3}, s->deep};
  s->n = 8;
}

/* The sample's values; variant changes some of them. */
static void make_sample(sample* s, int variant) {
  const float wv[6] = {1.5f, -0.0f, INFINITY, FLT_MIN / 4, -FLT_MAX, 3.25f};
  const int64_t kv[8] = {INT64_MIN, INT64_MAX, -1, 0, 1, 1LL << 40, -(1LL << 53) - 1, 42};
  memcpy(s->w, wv, sizeof wv);
  uint32_t nan_bits = 0x7fc01234u; /* a NaN with a payload: the round trip must keep its bits */
  memcpy(&s->w[5], &nan_bits, sizeof nan_bits);
  for (int i = 0; i < 5; i++) s->v[i] = (1.0 + variant) / (i + 3) - 1e300 * (i == 4);
  memcpy(s->k, kv, sizeof kv);
  s->k[7] += variant;
  for (int i = 0; i < 3; i++) s->odd[i] = (float)i / 7;
  s->after_odd[0] = DBL_TRUE_MIN;
  s->after_odd[1] = -M_PI;
  s->scalar = 0.1 * (variant + 1);
  for (int i = 0; i < 3; i++) s->deep[i] = -7 * i;
  name_tensors(s);
}

static const zn_ckpt_meta SAMPLE_META[] = {
    {"zenith.step", "200"}, {"zenith.job", "j-7"}, {"note", "naïve ✓"}, {"empty", ""}};
#define NMETA ((int)(sizeof SAMPLE_META / sizeof SAMPLE_META[0]))

/* Writes the sample (variant changes some values) and returns its digest in hex. */
static void write_sample(const char* path, int variant, char digest[65]) {
  sample s;
  make_sample(&s, variant);
  char err[512] = "";
  int rc = zn_ckpt_write(path, s.t, s.n, SAMPLE_META, NMETA, digest, NULL, err, sizeof err);
  if (rc != ZN_OK) fail_msg("writing %s: %s (%d)", path, err, rc);
}

static zn_ckpt* read_ok(const char* path) {
  zn_ckpt* c = NULL;
  char err[512] = "";
  int rc = zn_ckpt_read(path, &c, err, sizeof err);
  if (rc != ZN_OK) fail_msg("reading %s: %s (%d)", path, err, rc);
  return c;
}

/* The read must fail, and its message must name the file and contain `what`. */
static void expect_refused(const char* path, const char* what) {
  zn_ckpt* c = (zn_ckpt*)1;
  char err[1024] = "";
  int rc = zn_ckpt_read(path, &c, err, sizeof err);
  print_message("%s\n", err);
  if (rc == ZN_OK) fail_msg("%s was accepted; expected a refusal naming \"%s\"", path, what);
  assert_null(c);
  if (strncmp(err, path, strlen(path)) != 0)
    fail_msg("message does not start with %s: %s", path, err);
  if (!strstr(err, what)) fail_msg("message lacks \"%s\": %s", what, err);
}

static size_t elem_size(zn_ckpt_dtype d) {
  return d == ZN_CKPT_F32 ? 4 : 8;
}

static void assert_same_tensor(const zn_ckpt_tensor* want, const zn_ckpt_tensor* got) {
  assert_non_null(got);
  assert_string_equal(got->name, want->name);
  assert_int_equal(got->dtype, want->dtype);
  assert_int_equal(got->ndim, want->ndim);
  for (int d = 0; d < want->ndim; d++) assert_int_equal(got->shape[d], want->shape[d]);
  assert_int_equal(zn_ckpt_numel(got), zn_ckpt_numel(want));
  assert_int_equal((uintptr_t)got->data % elem_size(got->dtype), 0);
  size_t bytes = (size_t)zn_ckpt_numel(want) * elem_size(want->dtype);
  if (bytes && memcmp(got->data, want->data, bytes) != 0) fail_msg("tensor %s differs", want->name);
}

/* ---- files as bytes ---- */

static uint8_t* slurp(const char* path, size_t* len) {
  FILE* f = fopen(path, "rb");
  assert_non_null(f);
  fseek(f, 0, SEEK_END);
  *len = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t* buf = malloc(*len + 1);
  assert_int_equal(fread(buf, 1, *len, f), *len);
  fclose(f);
  buf[*len] = 0;
  return buf;
}

static void spit(const char* path, const void* data, size_t len) {
  FILE* f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(data, 1, len, f), len);
  assert_int_equal(fclose(f), 0);
}

static uint64_t header_length(const uint8_t* file) {
  uint64_t n = 0;
  for (int i = 0; i < 8; i++) n |= (uint64_t)file[i] << (8 * i);
  return n;
}

/* Copies src to dst with the byte at offset XORed with mask. */
static void copy_flipped(const char* src, const char* dst, size_t offset, uint8_t mask) {
  size_t len;
  uint8_t* buf = slurp(src, &len);
  assert_true(offset < len);
  buf[offset] ^= mask;
  spit(dst, buf, len);
  free(buf);
}

static void copy_cut(const char* src, const char* dst, size_t len) {
  size_t full;
  uint8_t* buf = slurp(src, &full);
  assert_true(len < full);
  spit(dst, buf, len);
  free(buf);
}

/* Writes a file by hand: the length of json, json, then data. */
static void write_raw(const char* path, const char* json, const void* data, size_t len) {
  size_t n = strlen(json);
  uint8_t* buf = malloc(8 + n + len + 1);
  for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)n >> (8 * i));
  memcpy(buf + 8, json, n);
  if (len) memcpy(buf + 8 + n, data, len);
  spit(path, buf, 8 + n + len);
  free(buf);
}

/* ---- round trips ---- */

static void tensors_round_trip_bit_for_bit(void** state) {
  char path[512];
  in_folder(state, "step-200.safetensors", path, sizeof path);
  sample s;
  make_sample(&s, 0);
  char digest[65];
  write_sample(path, 0, digest);

  zn_ckpt* c = read_ok(path);
  assert_int_equal(zn_ckpt_num_tensors(c), s.n);
  for (int i = 0; i < s.n; i++) {
    assert_same_tensor(&s.t[i], zn_ckpt_tensor_at(c, i));
    assert_ptr_equal(zn_ckpt_find(c, s.t[i].name), zn_ckpt_tensor_at(c, i));
  }
  assert_null(zn_ckpt_find(c, "absent"));
  assert_null(zn_ckpt_tensor_at(c, s.n));
  assert_string_equal(zn_ckpt_digest(c), digest);
  zn_ckpt_free(c);
}

static void checkpoint_without_tensors_round_trips(void** state) {
  char path[512];
  in_folder(state, "meta-only.safetensors", path, sizeof path);
  char digest[65], err[512] = "";
  assert_int_equal(zn_ckpt_write(path, NULL, 0, NULL, 0, digest, NULL, err, sizeof err), ZN_OK);
  zn_ckpt* c = read_ok(path);
  assert_int_equal(zn_ckpt_num_tensors(c), 0);
  assert_string_equal(zn_ckpt_digest(c), digest);
  zn_ckpt_free(c);
}

static void metadata_round_trips(void** state) {
  char path[512];
  in_folder(state, "meta.safetensors", path, sizeof path);
  char digest[65];
  write_sample(path, 0, digest);

  zn_ckpt* c = read_ok(path);
  for (int i = 0; i < NMETA; i++) {
    const char* got = zn_ckpt_meta_get(c, SAMPLE_META[i].key);
    assert_non_null(got);
    assert_string_equal(got, SAMPLE_META[i].value);
  }
  assert_null(zn_ckpt_meta_get(c, "absent"));
  assert_string_equal(zn_ckpt_meta_get(c, ZN_CKPT_DIGEST_KEY), digest);
  zn_ckpt_free(c);
}

/* The digest, recomputed here from the file's bytes with libcrypto's one-shot call: the hex the
 * writer returned, found in the header, replaced by zeros, hashed with the rest of the file. */
static void digest_is_sha256_of_file_with_digest_zeroed(void** state) {
  char path[512];
  in_folder(state, "digest.safetensors", path, sizeof path);
  char digest[65];
  write_sample(path, 0, digest);

  size_t len;
  uint8_t* file = slurp(path, &len);
  uint64_t n = header_length(file);
  assert_true(8 + n <= len);
  char* header = strndup((const char*)file + 8, n);
  char* at = strstr(header, digest);
  assert_non_null(at);
  assert_null(strstr(at + 1, digest));
  memset(file + 8 + (at - header), '0', 64);

  unsigned char md[32];
  unsigned int mdlen = 0;
  assert_true(EVP_Digest(file, len, md, &mdlen, EVP_sha256(), NULL));
  char hex[65];
  for (int i = 0; i < 32; i++) sprintf(hex + 2 * i, "%02x", md[i]);
  assert_string_equal(hex, digest);
  free(header);
  free(file);
}

/* The layout numpy and torch users rely on: an 8-aligned data section after a header padded with
 * spaces, and each tensor's offsets packed in the order written. */
static void header_follows_safetensors_layout(void** state) {
  char path[512];
  in_folder(state, "layout.safetensors", path, sizeof path);
  char digest[65];
  sample s;
  make_sample(&s, 0);
  int64_t bytes = 0;
  char err[512] = "";
  assert_int_equal(
      zn_ckpt_write(path, s.t, s.n, SAMPLE_META, NMETA, digest, &bytes, err, sizeof err), ZN_OK);

  size_t len;
  uint8_t* file = slurp(path, &len);
  assert_int_equal(bytes, (int64_t)len);
  uint64_t n = header_length(file);
  assert_int_equal((8 + n) % 8, 0);
  json_error_t jerr;
  json_t* root = json_loadb((const char*)file + 8, n, 0, &jerr);
  assert_non_null(root);
  assert_int_equal(json_object_size(root), s.n + 1);

  int64_t offset = 0;
  for (int i = 0; i < s.n; i++) {
    json_t* e = json_object_get(root, s.t[i].name);
    assert_non_null(e);
    const char* dtype = s.t[i].dtype == ZN_CKPT_F32   ? "F32"
                        : s.t[i].dtype == ZN_CKPT_F64 ? "F64"
                                                      : "I64";
    assert_string_equal(json_string_value(json_object_get(e, "dtype")), dtype);
    assert_int_equal(json_array_size(json_object_get(e, "shape")), s.t[i].ndim);
    json_t* offs = json_object_get(e, "data_offsets");
    assert_int_equal(json_integer_value(json_array_get(offs, 0)), offset);
    offset += zn_ckpt_numel(&s.t[i]) * (int64_t)elem_size(s.t[i].dtype);
    assert_int_equal(json_integer_value(json_array_get(offs, 1)), offset);
  }
  assert_int_equal(8 + (int64_t)n + offset, (int64_t)len);
  json_decref(root);
  free(file);
}

/* ---- damaged files ---- */

/* A good sample checkpoint, its size and header length, and a path for a damaged copy of it. */
typedef struct {
  char good[512], bad[512], digest[65];
  size_t len, header_len;
} damage;

static void prepare_damage(void** state, damage* d) {
  in_folder(state, "good.safetensors", d->good, sizeof d->good);
  in_folder(state, "bad.safetensors", d->bad, sizeof d->bad);
  write_sample(d->good, 0, d->digest);
  uint8_t* file = slurp(d->good, &d->len);
  d->header_len = (size_t)header_length(file);
  free(file);
}

static void flipped_data_byte_is_digest_mismatch(void** state) {
  damage d;
  prepare_damage(state, &d);
  copy_flipped(d.good, d.bad, d.len - 1, 0x01);
  expect_refused(d.bad, "digest mismatch");
  expect_refused(d.bad, d.digest); /* the message shows the digest the file claims */
  expect_refused(d.bad, "the file is damaged");
}

static void flipped_header_byte_is_refused(void** state) {
  damage d;
  prepare_damage(state, &d);
  uint8_t* file = slurp(d.good, &d.len);
  size_t name = (size_t)((uint8_t*)strstr((char*)file + 8, "\"weights\"") - file) + 1;
  size_t colon = (size_t)((uint8_t*)strstr((char*)file + 8, "\"dtype\":") - file) + 7;
  free(file);

  /* "weights" becomes "veights": still valid JSON, so only the digest can tell. */
  copy_flipped(d.good, d.bad, name, 0x01);
  expect_refused(d.bad, "digest mismatch");
  /* ':' becomes ';': no longer JSON. */
  copy_flipped(d.good, d.bad, colon, 0x01);
  expect_refused(d.bad, "damaged header");
  /* A digit of the digest itself. */
  copy_flipped(d.good, d.bad, 8 + strlen("{\"__metadata__\":{\"zenith.sha256\":\""), 0x04);
  expect_refused(d.bad, "digest");
}

/* Every bit flip tried in every byte of the length prefix is refused, each message about the
 * header's length or the header that no longer fits it. */
static void flipped_length_byte_is_refused(void** state) {
  damage d;
  prepare_damage(state, &d);
  const uint8_t masks[] = {0x01, 0x02, 0x08, 0x10, 0x80};
  for (size_t byte = 0; byte < 8; byte++) {
    for (size_t m = 0; m < sizeof masks; m++) {
      copy_flipped(d.good, d.bad, byte, masks[m]);
      expect_refused(d.bad, "header");
    }
  }
  copy_flipped(d.good, d.bad, 4, 0x02); /* 2^33 more bytes of header than there are */
  expect_refused(d.bad, "not a checkpoint: header length");
}

static void truncated_file_is_refused_at_every_cut(void** state) {
  damage d;
  prepare_damage(state, &d);
  size_t n = d.header_len, len = d.len;

  /* In the length, at its end, in the header, in its padding, at its end, in and after the first
   * tensor, and one byte short. */
  const size_t cuts[] = {3, 8, 8 + 10, 8 + n / 2, 8 + n - 1, 8 + n, 8 + n + 5, 8 + n + 24, len - 1};
  for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
    copy_cut(d.good, d.bad, cuts[i]);
    expect_refused(d.bad, "truncated");
  }
}

static void empty_file_is_not_a_checkpoint(void** state) {
  char path[512];
  in_folder(state, "empty.safetensors", path, sizeof path);
  spit(path, "", 0);
  expect_refused(path, "not a checkpoint: the file is empty");
}

static void missing_file_is_named(void** state) {
  char path[512], err[512] = "";
  in_folder(state, "step-404.safetensors", path, sizeof path);
  zn_ckpt* c = NULL;
  assert_int_equal(zn_ckpt_read(path, &c, err, sizeof err), ZN_ERR_NOT_FOUND);
  assert_null(c);
  expect_refused(path, "No such file");
}

/* A safetensors file written by another program has no digest: it is named as such. */
static void foreign_safetensors_file_is_not_a_zenith_checkpoint(void** state) {
  char path[512];
  in_folder(state, "foreign.safetensors", path, sizeof path);
  float x = 1;
  write_raw(path, "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", &x, 4);
  expect_refused(path, "not a Zenith checkpoint");
}

/* Headers whose offsets do not tile the data section: each fault is named. */
static void inconsistent_offsets_are_refused(void** state) {
  char path[512];
  in_folder(state, "offsets.safetensors", path, sizeof path);
  uint8_t data[32] = {0};
  const char* T = "\"dtype\":\"F32\",\"shape\":[2]";

  char json[512];
  snprintf(json, sizeof json, HEADER_START ",\"a\":{%s,\"data_offsets\":[0,12]}}", T);
  write_raw(path, json, data, 12);
  expect_refused(path, "but F32 [2] takes 8");

  snprintf(json, sizeof json,
           HEADER_START ",\"a\":{%s,\"data_offsets\":[0,8]},\"b\":{%s,\"data_offsets\":[4,12]}}", T,
           T);
  write_raw(path, json, data, 12);
  expect_refused(path, "overlap");

  snprintf(json, sizeof json,
           HEADER_START ",\"a\":{%s,\"data_offsets\":[0,8]},\"b\":{%s,\"data_offsets\":[12,20]}}",
           T, T);
  write_raw(path, json, data, 20);
  expect_refused(path, "gap of 4 bytes between tensors \"a\" and \"b\"");

  snprintf(json, sizeof json, HEADER_START ",\"a\":{%s,\"data_offsets\":[4,12]}}", T);
  write_raw(path, json, data, 12);
  expect_refused(path, "gap of 4 bytes before tensor \"a\"");

  snprintf(json, sizeof json, HEADER_START ",\"a\":{%s,\"data_offsets\":[0,8]}}", T);
  write_raw(path, json, data, 12);
  expect_refused(path, "but 12 follow the header");

  snprintf(json, sizeof json,
           HEADER_START ",\"a\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}");
  write_raw(path, json, data, 4);
  expect_refused(path, "dtype BF16");

  snprintf(json, sizeof json,
           HEADER_START ",\"a\":{%s,\"data_offsets\":[0,8]},\"a\":{%s,\"data_offsets\":[8,16]}}", T,
           T);
  write_raw(path, json, data, 16);
  expect_refused(path, "duplicate");
}

/* ---- writes that fail ---- */

static void bad_tensors_and_metadata_are_refused_before_writing(void** state) {
  char path[512], err[512];
  in_folder(state, "refused.safetensors", path, sizeof path);
  float x[2] = {1, 2};
  const struct {
    zn_ckpt_tensor t[2];
    int nt;
    zn_ckpt_meta m[2];
    int nm;
    const char* why;
  } cases[] = {
      {{{"a", ZN_CKPT_F32, 1, {2}, x}, {"a", ZN_CKPT_F32, 1, {2}, x}},
       2,
       {{0}},
       0,
       "two tensors are named \"a\""},
      {{{"__metadata__", ZN_CKPT_F32, 1, {2}, x}}, 1, {{0}}, 0, "reserved for metadata"},
      {{{"a", ZN_CKPT_F32, 5, {2}, x}}, 1, {{0}}, 0, "5 dimensions"},
      {{{"a", ZN_CKPT_F32, 1, {-2}, x}}, 1, {{0}}, 0, "negative dimension"},
      {{{"a", ZN_CKPT_F32, 1, {2}, NULL}}, 1, {{0}}, 0, "data is NULL"},
      {{{"\xff\xfe", ZN_CKPT_F32, 1, {2}, x}}, 1, {{0}}, 0, "not valid UTF-8"},
      {{{NULL}}, 0, {{"zenith.sha256", "x"}}, 1, "reserved for the digest"},
      {{{NULL}}, 0, {{"k", "1"}, {"k", "2"}}, 2, "two metadata entries have the key \"k\""},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    err[0] = 0;
    int rc = zn_ckpt_write(path, cases[i].t, cases[i].nt, cases[i].m, cases[i].nm, NULL, NULL, err,
                           sizeof err);
    print_message("%s\n", err);
    assert_int_equal(rc, ZN_ERR_INVALID);
    if (!strstr(err, path) || !strstr(err, cases[i].why)) fail_msg("case %zu: %s", i, err);
    assert_int_equal(access(path, F_OK), -1);
  }
  assert_int_equal(temp_files_in(*state), 0);
}

static void write_into_missing_folder_fails_cleanly(void** state) {
  char path[512], err[512] = "";
  in_folder(state, "no-such-folder/step-1.safetensors", path, sizeof path);
  sample s;
  make_sample(&s, 0);
  assert_int_equal(zn_ckpt_write(path, s.t, s.n, NULL, 0, NULL, NULL, err, sizeof err), ZN_ERR_IO);
  print_message("%s\n", err);
  assert_non_null(strstr(err, path));
  assert_non_null(strstr(err, "No such file"));
  assert_int_equal(temp_files_in(*state), 0);
}

/* Tries the write as a user who may not write in the folder: as root, whom permissions do not
 * stop, the write runs in a child that has become nobody. Returns the write's code. */
static int write_without_permission(const char* path, char* err, size_t errlen) {
  sample s;
  make_sample(&s, 1);
  if (geteuid() != 0) return zn_ckpt_write(path, s.t, s.n, NULL, 0, NULL, NULL, err, errlen);

  int fds[2];
  assert_int_equal(pipe(fds), 0);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(fds[0]);
    if (setgid(NOBODY) != 0 || setuid(NOBODY) != 0) _exit(100);
    int rc = zn_ckpt_write(path, s.t, s.n, NULL, 0, NULL, NULL, err, errlen);
    ssize_t unused = write(fds[1], err, strlen(err));
    (void)unused;
    _exit(-rc);
  }
  close(fds[1]);
  ssize_t got = read(fds[0], err, errlen - 1);
  err[got > 0 ? got : 0] = 0;
  close(fds[0]);
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFEXITED(status));
  assert_int_not_equal(WEXITSTATUS(status), 100);
  return -WEXITSTATUS(status);
}

static void write_into_read_only_folder_keeps_old_checkpoint(void** state) {
  char dir[512], path[512], err[512] = "";
  in_folder(state, "ro", dir, sizeof dir);
  in_folder(state, "ro/step-1.safetensors", path, sizeof path);
  assert_int_equal(mkdir(dir, 0755), 0);
  char old[65];
  write_sample(path, 0, old);

  assert_int_equal(chmod(*state, 0755), 0);
  assert_int_equal(chmod(dir, 0555), 0);
  int rc = write_without_permission(path, err, sizeof err);
  assert_int_equal(chmod(dir, 0755), 0);
  print_message("%s\n", err);
  assert_int_equal(rc, ZN_ERR_IO);
  assert_non_null(strstr(err, path));
  assert_non_null(strstr(err, "Permission denied"));

  zn_ckpt* c = read_ok(path);
  assert_string_equal(zn_ckpt_digest(c), old);
  zn_ckpt_free(c);
  assert_int_equal(temp_files_in(dir), 0);
}

/* A write that fails halfway (here the file size limit; in life a full disk) removes its
 * temporary file and leaves the checkpoint that was there. */
static void write_failing_midway_keeps_old_checkpoint(void** state) {
  char path[512], err[512] = "";
  in_folder(state, "step-1.safetensors", path, sizeof path);
  char old[65];
  write_sample(path, 0, old);

  enum { N = 16384 };
  static float big[N];
  for (int i = 0; i < N; i++) big[i] = (float)i;
  zn_ckpt_tensor t = {"big", ZN_CKPT_F32, 1, {N}, big};

  struct rlimit saved, lim;
  assert_int_equal(getrlimit(RLIMIT_FSIZE, &saved), 0);
  lim = saved;
  lim.rlim_cur = 4096;
  void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
  assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
  int rc = zn_ckpt_write(path, &t, 1, NULL, 0, NULL, NULL, err, sizeof err);
  assert_int_equal(setrlimit(RLIMIT_FSIZE, &saved), 0);
  signal(SIGXFSZ, prev);

  print_message("%s\n", err);
  assert_int_equal(rc, ZN_ERR_IO);
  assert_non_null(strstr(err, "cannot write temporary file"));
  zn_ckpt* c = read_ok(path);
  assert_string_equal(zn_ckpt_digest(c), old);
  zn_ckpt_free(c);
  assert_int_equal(temp_files_in(*state), 0);
}

/* The rename is the last step that can fail: onto a folder, it does, and the folder stays. */
static void failed_rename_removes_temp_file(void** state) {
  char path[512], err[512] = "";
  in_folder(state, "step-1.safetensors", path, sizeof path);
  assert_int_equal(mkdir(path, 0755), 0);
  double x = 1;
  zn_ckpt_tensor t = {"x", ZN_CKPT_F64, 0, {0}, &x};
  assert_int_equal(zn_ckpt_write(path, &t, 1, NULL, 0, NULL, NULL, err, sizeof err), ZN_ERR_IO);
  print_message("%s\n", err);
  assert_non_null(strstr(err, "cannot rename"));
  struct stat st;
  assert_int_equal(stat(path, &st), 0);
  assert_true(S_ISDIR(st.st_mode));
  assert_int_equal(temp_files_in(*state), 0);
}

static void overwrite_replaces_checkpoint(void** state) {
  char path[512];
  in_folder(state, "latest.safetensors", path, sizeof path);
  char first[65], second[65];
  write_sample(path, 0, first);
  write_sample(path, 1, second);
  assert_string_not_equal(first, second);

  sample s;
  make_sample(&s, 1);
  zn_ckpt* c = read_ok(path);
  assert_string_equal(zn_ckpt_digest(c), second);
  for (int i = 0; i < s.n; i++) assert_same_tensor(&s.t[i], zn_ckpt_find(c, s.t[i].name));
  zn_ckpt_free(c);
  assert_int_equal(temp_files_in(*state), 0);
}

static void damaged_newer_checkpoint_leaves_older_readable(void** state) {
  char older[512], newer[512];
  in_folder(state, "step-100.safetensors", older, sizeof older);
  in_folder(state, "step-200.safetensors", newer, sizeof newer);
  char d100[65], d200[65];
  write_sample(older, 0, d100);
  write_sample(newer, 1, d200);

  size_t len;
  free(slurp(newer, &len));
  copy_flipped(newer, newer, len - 9, 0x40);
  expect_refused(newer, "digest mismatch");

  sample s;
  make_sample(&s, 0);
  zn_ckpt* c = read_ok(older);
  assert_string_equal(zn_ckpt_digest(c), d100);
  for (int i = 0; i < s.n; i++) assert_same_tensor(&s.t[i], zn_ckpt_tensor_at(c, i));
  zn_ckpt_free(c);
}

#define T(f) cmocka_unit_test_setup_teardown(f, make_folder, remove_folder)

int main(void) {
  const struct CMUnitTest tests[] = {
      T(tensors_round_trip_bit_for_bit),
      T(checkpoint_without_tensors_round_trips),
      T(metadata_round_trips),
      T(digest_is_sha256_of_file_with_digest_zeroed),
      T(header_follows_safetensors_layout),
      T(flipped_data_byte_is_digest_mismatch),
      T(flipped_header_byte_is_refused),
      T(flipped_length_byte_is_refused),
      T(truncated_file_is_refused_at_every_cut),
      T(empty_file_is_not_a_checkpoint),
      T(missing_file_is_named),
      T(foreign_safetensors_file_is_not_a_zenith_checkpoint),
      T(inconsistent_offsets_are_refused),
      T(bad_tensors_and_metadata_are_refused_before_writing),
      T(write_into_missing_folder_fails_cleanly),
      T(write_into_read_only_folder_keeps_old_checkpoint),
      T(write_failing_midway_keeps_old_checkpoint),
      T(failed_rename_removes_temp_file),
      T(overwrite_replaces_checkpoint),
      T(damaged_newer_checkpoint_leaves_older_readable),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
