/* check_listen.c — the client sockets: how http_listen and socket_group are read, and that
 * opening never replaces what it must not and leaves nothing behind when it fails. */
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "keypool/listen.h"

#define N(a) (sizeof (a) / sizeof (a)[0])

static char dir[64];
static char path[128];

static void make_dir(void) {
        snprintf(dir, sizeof dir, "/tmp/check_listen.XXXXXX");
        ck_assert_ptr_nonnull(mkdtemp(dir));
        /* A directory that does not exist yet: listen_open makes it. */
        snprintf(path, sizeof path, "%s/run/keypool.sock", dir);
}

static void remove_dir(void) {
        char sub[96];

        unlink(path);
        snprintf(sub, sizeof sub, "%s/run", dir);
        rmdir(sub);
        rmdir(dir);
}

static struct listen_spec unix_spec(void) {
        return (struct listen_spec) { .path = path, .mode = 0600 };
}

START_TEST(test_the_socket_is_created_with_its_mode_and_removed_on_close)
{
        struct listen_spec spec = unix_spec();
        struct listen_sockets l;
        enum listen_step failed = 0;
        struct stat st;

        make_dir();
        ck_assert_int_eq(listen_open(&spec, &l, &failed), 0);
        ck_assert(!l.inherited);
        ck_assert_int_ge(l.unix_fd, 0);
        ck_assert_int_eq(l.tcp_fd, -1);
        ck_assert_int_eq(lstat(path, &st), 0);
        ck_assert(S_ISSOCK(st.st_mode));
        ck_assert_uint_eq(st.st_mode & 0777, 0600);

        listen_close(&l);
        ck_assert_int_eq(l.unix_fd, -1);
        ck_assert_msg(lstat(path, &st) < 0 && errno == ENOENT, "expected the socket file to be gone");
        listen_close(&l);
        remove_dir();
}
END_TEST

START_TEST(test_a_file_that_is_not_a_socket_is_never_replaced)
{
        struct listen_spec spec = unix_spec();
        struct listen_sockets l = { .unix_fd = 77 };
        enum listen_step failed = 0;
        struct stat st;
        char sub[96];
        FILE *f;

        make_dir();
        snprintf(sub, sizeof sub, "%s/run", dir);
        ck_assert_int_eq(mkdir(sub, 0755), 0);
        f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        fclose(f);

        ck_assert_int_eq(listen_open(&spec, &l, &failed), -EEXIST);
        ck_assert_int_eq(failed, LISTEN_STEP_NOT_A_SOCKET);
        ck_assert_int_eq(l.unix_fd, 77);
        ck_assert_int_eq(lstat(path, &st), 0);
        ck_assert(S_ISREG(st.st_mode));
        remove_dir();
}
END_TEST

START_TEST(test_a_stale_socket_is_replaced_but_a_live_one_is_refused)
{
        struct listen_spec spec = unix_spec();
        struct listen_sockets dead, first, second;
        enum listen_step failed = 0;
        struct stat st;

        make_dir();
        /* A server that died without removing its file. */
        ck_assert_int_eq(listen_open(&spec, &dead, &failed), 0);
        close(dead.unix_fd);
        free(dead.created_path);
        ck_assert_int_eq(listen_open(&spec, &first, &failed), 0);

        ck_assert_int_eq(listen_open(&spec, &second, &failed), -EADDRINUSE);
        ck_assert_int_eq(failed, LISTEN_STEP_IN_USE);
        ck_assert_msg(lstat(path, &st) == 0, "expected the live server's file to stay");

        listen_close(&first);
        remove_dir();
}
END_TEST

START_TEST(test_a_tcp_listener_that_cannot_open_leaves_no_socket_file_behind)
{
        struct listen_spec spec = unix_spec();
        struct listen_sockets l;
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof sa;
        enum listen_step failed = 0;
        struct stat st;
        int busy = socket(AF_INET, SOCK_STREAM, 0);

        make_dir();
        ck_assert_int_ge(busy, 0);
        ck_assert_int_eq(bind(busy, (struct sockaddr *) &sa, sizeof sa), 0);
        ck_assert_int_eq(listen(busy, 1), 0);
        ck_assert_int_eq(getsockname(busy, (struct sockaddr *) &sa, &len), 0);
        spec.tcp = true;
        snprintf(spec.tcp_host, sizeof spec.tcp_host, "127.0.0.1");
        snprintf(spec.tcp_port, sizeof spec.tcp_port, "%u", (unsigned) ntohs(sa.sin_port));

        ck_assert_int_eq(listen_open(&spec, &l, &failed), -EADDRINUSE);
        ck_assert_int_eq(failed, LISTEN_STEP_TCP);
        ck_assert_msg(lstat(path, &st) < 0 && errno == ENOENT, "expected no socket file after a failure");
        close(busy);
        remove_dir();
}
END_TEST

static Suite *listen_suite(void) {
        Suite *s = suite_create("listen");
        TCase *parse = tcase_create("parse"), *open = tcase_create("open");
        tcase_add_test(open, test_the_socket_is_created_with_its_mode_and_removed_on_close);
        tcase_add_test(open, test_a_file_that_is_not_a_socket_is_never_replaced);
        tcase_add_test(open, test_a_stale_socket_is_replaced_but_a_live_one_is_refused);
        tcase_add_test(open, test_a_tcp_listener_that_cannot_open_leaves_no_socket_file_behind);
        suite_add_tcase(s, parse);
        suite_add_tcase(s, open);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(listen_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
