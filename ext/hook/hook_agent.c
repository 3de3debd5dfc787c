/* deltaxfer's action script for the dumps `deltaxfer migrate` starts: the shortest way
 * from CRIU's post-dump to the migration agent, because CRIU runs it inside the freeze.
 *
 * The same exchange as src/deltaxfer/hook_agent.py (which stays the reference and the
 * fallback) in ~1 ms instead of a Python interpreter start (~20 ms here): for the actions
 * pre-dump and post-dump it connects to the agent's unix socket ($DELTAXFER_AGENT), sends
 * one JSON line {"action", "image_dir", "init_pid"} and reads one JSON line back; it exits
 * 0 when the answer says "ok": true, 1 (CRIU resumes the tasks) when it says false.
 * Anything else -- no agent in the environment, the agent gone, no or an unreadable
 * answer -- hands over to the full hook, `$DELTAXFER_PYTHON -m deltaxfer.hook`, with
 * $DELTAXFER_AGENT_FAILED set when the agent was asked and did not answer (the full hook
 * must not ask again: a second post-dump would run the final round twice).  Other actions
 * need nothing from the agent: exit 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define AGENT_ENV "DELTAXFER_AGENT"
#define TIMEOUT_ENV "DELTAXFER_HOOK_TIMEOUT"
#define AGENT_FAILED_ENV "DELTAXFER_AGENT_FAILED"
#define PYTHON_ENV "DELTAXFER_PYTHON"

static void full_hook(const char *failed)
{
    const char *py = getenv(PYTHON_ENV);
    if (!py || !*py)
        py = "python3";
    if (failed)
        setenv(AGENT_FAILED_ENV, failed, 1);
    char *argv[] = {(char *)py, "-m", "deltaxfer.hook", NULL};
    execvp(py, argv);
    fprintf(stderr, "deltaxfer hook: cannot run the full hook (%s -m deltaxfer.hook): %s; "
            "criu resumes the tasks\n", py, strerror(errno));
    exit(1);
}

/* Append s as a JSON string (or null) to out. */
static size_t put_json_string(char *out, size_t at, size_t cap, const char *s)
{
    if (!s) {
        at += (size_t)snprintf(out + at, at < cap ? cap - at : 0, "null");
        return at;
    }
    if (at < cap)
        out[at] = '"';
    at++;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        const char *piece;
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\';
            esc[1] = (char)*p;
            esc[2] = 0;
            piece = esc;
        } else if (*p < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            piece = esc;
        } else {
            esc[0] = (char)*p;
            esc[1] = 0;
            piece = esc;
        }
        for (const char *q = piece; *q; q++) {
            if (at < cap)
                out[at] = *q;
            at++;
        }
    }
    if (at < cap)
        out[at] = '"';
    return at + 1;
}

/* The value after "key": in a flat JSON object, or NULL. */
static const char *json_value(const char *line, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = strstr(line, pat);
    if (!p)
        return NULL;
    p += strlen(pat);
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p != ':')
        return NULL;
    p++;
    while (*p == ' ' || *p == '\t')
        p++;
    return p;
}

int main(void)
{
    const char *action = getenv("CRTOOLS_SCRIPT_ACTION");
    if (!action || (strcmp(action, "pre-dump") && strcmp(action, "post-dump")))
        return 0;
    const char *agent = getenv(AGENT_ENV);
    if (!agent || !*agent)
        full_hook(NULL);

    char failed[512];
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(agent) >= sizeof sa.sun_path) {
        snprintf(failed, sizeof failed, "the migration agent is gone (socket path too long)");
        full_hook(failed);
    }
    strcpy(sa.sun_path, agent);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        snprintf(failed, sizeof failed, "the migration agent is gone (socket: %s)",
                 strerror(errno));
        full_hook(failed);
    }
    const char *t = getenv(TIMEOUT_ENV);
    double timeout = t ? atof(t) : 0;
    if (timeout > 0) {
        struct timeval tv = {.tv_sec = (time_t)timeout,
                             .tv_usec = (suseconds_t)((timeout - (time_t)timeout) * 1e6)};
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        snprintf(failed, sizeof failed, "the migration agent is gone (%s)", strerror(errno));
        full_hook(failed);
    }
    char msg[16384];
    size_t n = (size_t)snprintf(msg, sizeof msg, "{\"action\": ");
    n = put_json_string(msg, n, sizeof msg, action);
    n += (size_t)snprintf(msg + n, n < sizeof msg ? sizeof msg - n : 0, ", \"image_dir\": ");
    n = put_json_string(msg, n, sizeof msg, getenv("CRTOOLS_IMAGE_DIR"));
    n += (size_t)snprintf(msg + n, n < sizeof msg ? sizeof msg - n : 0, ", \"init_pid\": ");
    n = put_json_string(msg, n, sizeof msg, getenv("CRTOOLS_INIT_PID"));
    n += (size_t)snprintf(msg + n, n < sizeof msg ? sizeof msg - n : 0, "}\n");
    if (n >= sizeof msg) {
        snprintf(failed, sizeof failed, "the migration agent is gone (request too long)");
        full_hook(failed);
    }
    for (size_t off = 0; off < n;) {
        ssize_t w = write(s, msg + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            snprintf(failed, sizeof failed, "the migration agent is gone (%s)",
                     w < 0 ? strerror(errno) : "short write");
            full_hook(failed);
        }
        off += (size_t)w;
    }
    char line[65536];
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t r = read(s, line + got, sizeof line - 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            snprintf(failed, sizeof failed, "the migration agent is gone (%s)",
                     strerror(errno));
            full_hook(failed);
        }
        if (r == 0)
            break;
        got += (size_t)r;
        if (memchr(line + got - (size_t)r, '\n', (size_t)r))
            break;
    }
    line[got] = 0;
    close(s);
    char *nl = strchr(line, '\n');
    if (!nl) {
        snprintf(failed, sizeof failed, "the migration agent is gone (%s)",
                 got ? "an answer without its end" :
                       "it closed the connection without an answer");
        full_hook(failed);
    }
    *nl = 0;
    const char *ok = json_value(line, "ok");
    if (ok && !strncmp(ok, "true", 4))
        return 0;
    if (!ok || strncmp(ok, "false", 5)) {
        snprintf(failed, sizeof failed, "the migration agent is gone (unreadable answer "
                 "%.80s)", line);
        full_hook(failed);
    }
    /* the reason string, its escapes left as they are */
    const char *reason = json_value(line, "reason");
    int len = 0;
    if (reason && *reason == '"') {
        reason++;
        while (reason[len] && reason[len] != '"') {
            if (reason[len] == '\\' && reason[len + 1])
                len++;
            len++;
        }
    } else {
        reason = "(no reason given)";
        len = (int)strlen(reason);
    }
    fprintf(stderr, "deltaxfer hook: %s failed: %.*s; criu resumes the tasks\n", action, len,
            reason);
    return 1;
}
