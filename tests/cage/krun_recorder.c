/*
 * libkrun-recorder: a TEST DOUBLE for libkrun's C API.  It is not libkrun and starts no VM.
 *
 * It exports the krun_* functions cage's ctypes binding uses, with the exact prototypes of libkrun.h (1.18), and
 * appends one JSON line per call to the file named by $KRUN_RECORDER_LOG: the function name, every argument with
 * its C type (so integer widths are visible), strings, NULL-terminated string arrays (or null for a NULL
 * pointer), MAC bytes, and the value returned.  The log fd is opened on the first call and kept, so calls made
 * after the caller drops privileges are still recorded.
 *
 *   KRUN_RECORDER_LOG       where to append (required)
 *   KRUN_RECORDER_FAIL      "krun_name:errno[,krun_name:errno...]": that call returns -errno
 *   KRUN_RECORDER_CTX       the id krun_create_ctx returns (default 7)
 *   KRUN_RECORDER_FEATURES  comma-separated feature numbers krun_has_feature reports as present (default "0,1")
 *
 * Compiled with -DKRUN_RECORDER_NO_VIRTIOFS3 it lacks krun_add_virtiofs3, like a libkrun older than 1.18.
 *
 * krun_start_enter stands in for the VMM taking over the process: it records the caller's credentials
 * (getresuid/getresgid, supplementary groups, CapEff), its /proc/self/cmdline and its environment, then _exit(0)s.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

#define MAX_STRV 65536

struct buf {
    char *data;
    size_t len, cap;
    int nargs;
};

static int log_fd = -1;

static void put(struct buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap)
            cap *= 2;
        char *data = realloc(b->data, cap);
        if (!data)
            abort();
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void putf(struct buf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    put(b, tmp, (size_t)n);
}

/* A JSON string; bytes >= 0x80 pass through (UTF-8 stays UTF-8), control bytes are \u escaped. */
static void put_json_str(struct buf *b, const char *s, size_t n) {
    puts_(b, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            put(b, esc, 2);
        } else if (c < 0x20 || c == 0x7f) {
            putf(b, "\\u%04x", c);
        } else {
            put(b, (const char *)&c, 1);
        }
    }
    puts_(b, "\"");
}

static void begin(struct buf *b, const char *name) {
    memset(b, 0, sizeof *b);
    puts_(b, "{\"call\":");
    put_json_str(b, name, strlen(name));
    puts_(b, ",\"args\":{");
}

static void arg_head(struct buf *b, const char *name, const char *type) {
    if (b->nargs++)
        puts_(b, ",");
    put_json_str(b, name, strlen(name));
    puts_(b, ":{\"type\":");
    put_json_str(b, type, strlen(type));
    puts_(b, ",\"value\":");
}

static void arg_uint(struct buf *b, const char *name, const char *type, uint64_t v) {
    arg_head(b, name, type);
    putf(b, "%" PRIu64 "}", v);
}

__attribute__((unused)) static void arg_bool(struct buf *b, const char *name, bool v) {
    arg_head(b, name, "bool");
    puts_(b, v ? "true}" : "false}");
}

static void arg_str(struct buf *b, const char *name, const char *type, const char *s) {
    arg_head(b, name, type);
    if (s)
        put_json_str(b, s, strlen(s));
    else
        puts_(b, "null");
    puts_(b, "}");
}

static void put_strv(struct buf *b, char *const *v) {
    if (!v) {
        puts_(b, "null");
        return;
    }
    puts_(b, "[");
    for (size_t i = 0; v[i] && i < MAX_STRV; i++) {
        if (i)
            puts_(b, ",");
        put_json_str(b, v[i], strlen(v[i]));
    }
    puts_(b, "]");
}

static void arg_strv(struct buf *b, const char *name, const char *const v[]) {
    arg_head(b, name, "strv");
    put_strv(b, (char *const *)v);
    puts_(b, "}");
}

static void arg_mac(struct buf *b, const char *name, const uint8_t *mac) {
    arg_head(b, name, "u8[6]");
    if (!mac) {
        puts_(b, "null}");
        return;
    }
    putf(b, "[%u,%u,%u,%u,%u,%u]}", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
}

/* -errno when $KRUN_RECORDER_FAIL names this call, else ok. */
static int32_t configured_result(const char *name, int32_t ok) {
    const char *spec = getenv("KRUN_RECORDER_FAIL");
    size_t len = strlen(name);
    while (spec && *spec) {
        if (strncmp(spec, name, len) == 0 && spec[len] == ':')
            return -(int32_t)strtol(spec + len + 1, NULL, 10);
        spec = strchr(spec, ',');
        if (spec)
            spec++;
    }
    return ok;
}

static void write_line(struct buf *b) {
    if (log_fd < 0) {
        const char *path = getenv("KRUN_RECORDER_LOG");
        if (!path) {
            fprintf(stderr, "libkrun-recorder: KRUN_RECORDER_LOG is not set\n");
            abort();
        }
        log_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (log_fd < 0) {
            perror("libkrun-recorder: open KRUN_RECORDER_LOG");
            abort();
        }
    }
    put(b, "\n", 1);
    size_t off = 0;
    while (off < b->len) {
        ssize_t n = write(log_fd, b->data + off, b->len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            abort();
        off += (size_t)n;
    }
    free(b->data);
}

static int32_t finish(struct buf *b, const char *name, int32_t ok) {
    int32_t result = configured_result(name, ok);
    putf(b, "},\"ret\":%" PRId32 "}", result);
    write_line(b);
    return result;
}

/* ---------------------------------------------------------------------------------------- the libkrun API */

int32_t krun_set_log_level(uint32_t level) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "level", "u32", level);
    return finish(&b, __func__, 0);
}

int32_t krun_create_ctx(void) {
    struct buf b;
    begin(&b, __func__);
    const char *ctx = getenv("KRUN_RECORDER_CTX");
    return finish(&b, __func__, ctx ? (int32_t)strtol(ctx, NULL, 10) : 7);
}

int32_t krun_free_ctx(uint32_t ctx_id) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    return finish(&b, __func__, 0);
}

int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_uint(&b, "num_vcpus", "u8", num_vcpus);
    arg_uint(&b, "ram_mib", "u32", ram_mib);
    return finish(&b, __func__, 0);
}

int32_t krun_set_root(uint32_t ctx_id, const char *root_path) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_str(&b, "root_path", "str", root_path);
    return finish(&b, __func__, 0);
}

int32_t krun_add_virtiofs(uint32_t ctx_id, const char *c_tag, const char *c_path) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_str(&b, "c_tag", "str", c_tag);
    arg_str(&b, "c_path", "str", c_path);
    return finish(&b, __func__, 0);
}

#ifndef KRUN_RECORDER_NO_VIRTIOFS3 /* build a libkrun < 1.18 double */
int32_t krun_add_virtiofs3(uint32_t ctx_id, const char *c_tag, const char *c_path, uint64_t shm_size,
                           bool read_only) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_str(&b, "c_tag", "str", c_tag);
    arg_str(&b, "c_path", "str", c_path);
    arg_uint(&b, "shm_size", "u64", shm_size);
    arg_bool(&b, "read_only", read_only);
    return finish(&b, __func__, 0);
}
#endif

int32_t krun_set_exec(uint32_t ctx_id, const char *exec_path, const char *const argv[], const char *const envp[]) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_str(&b, "exec_path", "str", exec_path);
    arg_strv(&b, "argv", argv);
    arg_strv(&b, "envp", envp);
    return finish(&b, __func__, 0);
}

int32_t krun_set_env(uint32_t ctx_id, const char *const envp[]) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_strv(&b, "envp", envp);
    return finish(&b, __func__, 0);
}

int32_t krun_set_workdir(uint32_t ctx_id, const char *workdir_path) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_str(&b, "workdir_path", "str", workdir_path);
    return finish(&b, __func__, 0);
}

int32_t krun_set_rlimits(uint32_t ctx_id, const char *const rlimits[]) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_strv(&b, "rlimits", rlimits);
    return finish(&b, __func__, 0);
}

int32_t krun_add_net_tap(uint32_t ctx_id, char *c_tap_name, uint8_t *const c_mac, uint32_t features,
                         uint32_t flags) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_str(&b, "c_tap_name", "str", c_tap_name);
    arg_mac(&b, "c_mac", c_mac);
    arg_uint(&b, "features", "u32", features);
    arg_uint(&b, "flags", "u32", flags);
    return finish(&b, __func__, 0);
}

int32_t krun_add_vsock_port(uint32_t ctx_id, uint32_t port, const char *c_filepath) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_uint(&b, "port", "u32", port);
    arg_str(&b, "c_filepath", "str", c_filepath);
    return finish(&b, __func__, 0);
}

int32_t krun_set_console_output(uint32_t ctx_id, const char *c_filepath) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    arg_str(&b, "c_filepath", "str", c_filepath);
    return finish(&b, __func__, 0);
}

int32_t krun_has_feature(uint64_t feature) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "feature", "u64", feature);
    const char *list = getenv("KRUN_RECORDER_FEATURES");
    if (!list)
        list = "0,1";
    int32_t present = 0;
    for (const char *p = list; p && *p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
        if (strtoull(p, NULL, 10) == feature)
            present = 1;
    }
    return finish(&b, __func__, present);
}

/* The caller's process as the VMM would run: credentials, argv as the kernel shows it, environment. */
static void record_process(struct buf *b) {
    uid_t ruid, euid, suid;
    gid_t rgid, egid, sgid;
    getresuid(&ruid, &euid, &suid);
    getresgid(&rgid, &egid, &sgid);
    puts_(b, ",\"process\":{");
    putf(b, "\"uid\":[%u,%u,%u],\"gid\":[%u,%u,%u],\"groups\":[", ruid, euid, suid, rgid, egid, sgid);
    gid_t groups[256];
    int n = getgroups(256, groups);
    for (int i = 0; i < n; i++)
        putf(b, i ? ",%u" : "%u", groups[i]);
    puts_(b, "],\"cap_eff\":");
    char line[256];
    const char *cap = NULL;
    FILE *status = fopen("/proc/self/status", "re");
    while (status && fgets(line, sizeof line, status)) {
        if (strncmp(line, "CapEff:", 7) == 0) {
            cap = line + 7;
            while (*cap == '\t' || *cap == ' ')
                cap++;
            line[strcspn(line, "\n")] = '\0';
            break;
        }
    }
    if (cap)
        put_json_str(b, cap, strlen(cap));
    else
        puts_(b, "null");
    if (status)
        fclose(status);
    puts_(b, ",\"cmdline\":");
    int fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        char data[65536];
        ssize_t len = read(fd, data, sizeof data);
        close(fd);
        puts_(b, "[");
        for (ssize_t off = 0, first = 1; len > 0 && off < len; first = 0) {
            size_t arg_len = strnlen(data + off, (size_t)(len - off));
            if (!first)
                puts_(b, ",");
            put_json_str(b, data + off, arg_len);
            off += (ssize_t)arg_len + 1;
        }
        puts_(b, "]");
    } else {
        puts_(b, "null");
    }
    puts_(b, ",\"environ\":");
    put_strv(b, environ);
    char cwd[4096];
    puts_(b, ",\"cwd\":");
    if (getcwd(cwd, sizeof cwd))
        put_json_str(b, cwd, strlen(cwd));
    else
        puts_(b, "null");
    puts_(b, "}");
}

int32_t krun_start_enter(uint32_t ctx_id) {
    struct buf b;
    begin(&b, __func__);
    arg_uint(&b, "ctx_id", "u32", ctx_id);
    int32_t result = configured_result(__func__, 0);
    putf(&b, "},\"ret\":%" PRId32, result);
    record_process(&b);
    puts_(&b, "}");
    write_line(&b);
    if (result < 0)
        return result;
    _exit(0); /* the VM would have taken over the process here */
}
