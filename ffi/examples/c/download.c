/*
 * download SOCKET URL DEST: downloads URL to DEST through the dlsessiond listening on
 * SOCKET, in the background session "org.example.c-download", printing its events.
 *
 * Exits 0 only if the task completed without error; otherwise prints the error's code
 * and message and exits 1 (2 for bad usage).
 *
 * Build: see the Makefile beside this file, or
 *   cc -I ffi/include download.c -o download target/release/libdlsession_ffi.a \
 *      -lgcc_s -lutil -lrt -lpthread -lm -ldl
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <dlsession.h>

/* What the callback learned. Written on the session's thread; read by main only after
 * dls_session_free, which waits for callbacks and runs none afterwards. */
#define MAX_COMPLETED 64
struct state {
    struct {
        uint64_t task;
        int code;
    } completed[MAX_COMPLETED];
    size_t n_completed;
};

static void on_event(const dls_event *e, void *user_data) {
    struct state *st = user_data;
    switch (e->kind) {
    case DLS_EVENT_PROGRESS:
        printf("progress task=%" PRIu64 " written=%" PRId64 " expected=%" PRId64 "\n", e->task_id,
               e->total_bytes_written, e->total_bytes_expected);
        break;
    case DLS_EVENT_RESUMED:
        printf("resumed task=%" PRIu64 " offset=%" PRId64 "\n", e->task_id, e->offset);
        break;
    case DLS_EVENT_FINISHED_DOWNLOADING:
        /* With a destination the daemon has put the file there already; without one,
         * this is where to move it from, before returning. */
        printf("finished task=%" PRIu64 " location=%s\n", e->task_id, e->location);
        break;
    case DLS_EVENT_COMPLETED:
        printf("completed task=%" PRIu64 " code=%d (%s)", e->task_id, e->error_code,
               dls_code_name(e->error_code));
        if (e->http_status != 0)
            printf(" http_status=%d", e->http_status);
        if (e->error_message != NULL)
            printf(" message=%s", e->error_message);
        printf("\n");
        if (st->n_completed < MAX_COMPLETED) {
            st->completed[st->n_completed].task = e->task_id;
            st->completed[st->n_completed].code = e->error_code;
            st->n_completed++;
        }
        break;
    case DLS_EVENT_FINISHED_EVENTS:
        printf("finished-events\n");
        break;
    default:
        printf("event kind=%d code=%d (%s) %s\n", (int)e->kind, e->error_code,
               dls_code_name(e->error_code), e->error_message ? e->error_message : "");
        break;
    }
    fflush(stdout);
}

/* Prints a failed call's error, frees it, and returns 1 (the exit status). */
static int fail(const char *what, dls_error *err) {
    fprintf(stderr, "%s failed: code=%d (%s): %s\n", what, dls_error_code(err),
            dls_code_name(dls_error_code(err)), err ? dls_error_message(err) : "(no message)");
    dls_error_free(err);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET URL DEST\n", argv[0]);
        return 2;
    }
    printf("dlsession %s\n", dls_version());

    dls_error *err = NULL;
    dls_config *config = dls_config_new("org.example.c-download", &err);
    if (config == NULL)
        return fail("dls_config_new", err);
    if (dls_config_set_socket(config, argv[1], &err) != DLS_OK) {
        dls_config_free(config);
        return fail("dls_config_set_socket", err);
    }

    struct state st = {0};
    dls_session *session = dls_session_attach(config, on_event, &st, &err);
    dls_config_free(config); /* attaching copied it */
    if (session == NULL)
        return fail("dls_session_attach", err);

    uint64_t task = 0;
    if (dls_download(session, argv[2], argv[3], 0, &task, &err) != DLS_OK) {
        dls_session_free(session);
        return fail("dls_download", err);
    }
    printf("created task=%" PRIu64 "\n", task);
    fflush(stdout);

    bool idle = false;
    dls_code code = dls_session_wait_idle(session, 60 * 1000, &idle, &err);
    dls_session_free(session); /* no callback runs after this: `st` is ours again */
    if (code != DLS_OK)
        return fail("dls_session_wait_idle", err);
    if (!idle) {
        fprintf(stderr, "task %" PRIu64 " did not finish within 60 s\n", task);
        return 1;
    }

    for (size_t i = 0; i < st.n_completed; i++) {
        if (st.completed[i].task != task)
            continue; /* an earlier run's task, delivered again */
        if (st.completed[i].code == DLS_OK) {
            printf("ok: task %" PRIu64 " completed, file at %s\n", task, argv[3]);
            return 0;
        }
        fprintf(stderr, "task %" PRIu64 " failed: code=%d (%s)\n", task, st.completed[i].code,
                dls_code_name(st.completed[i].code));
        return 1;
    }
    fprintf(stderr, "task %" PRIu64 ": no completed event was delivered\n", task);
    return 1;
}
