/* serve.h: what the async_chat example servers (http_server, resp_server,
 * line_server) share — listen on 127.0.0.1:PORT, run asyncore's loop()
 * until SIGINT or SIGTERM, clean up.  echo_server and http_client keep
 * theirs inline: they are the asyncore documentation's programs, shown
 * whole. */
#ifndef EXAMPLES_SERVE_H
#define EXAMPLES_SERVE_H

#include <uvasyncore.h>

#include <stdio.h>
#include <stdlib.h>

/* SIGINT, SIGTERM: ac_loop returns AC_EXIT. */
static void serve_on_signal(uv_signal_t *s, int signum) {
  (void) signum;
  ac_map_stop(s->data);
}

/* Listens on 127.0.0.1:`port` with a server channel of `ops` (on the
 * default map) and runs ac_loop (poll mode) until a signal.  Returns the
 * process exit status: 0, or 1 when the server could not listen. */
static int serve(const char *name, const char *port,
                 const ac_dispatcher_ops_t *ops) {
  ac_dispatcher_t server;
  struct sockaddr_in addr;
  uv_signal_t sigint, sigterm;
  ac_map_t *map = ac_default_map();
  int r = map != NULL ? 0 : UV_ENOMEM;

  if (r == 0) {
    r = uv_ip4_addr("127.0.0.1", atoi(port), &addr);
  }
  if (r == 0) {
    r = ac_dispatcher_init(&server, map, ops);
  }
  if (r == 0) {
    r = ac_create_socket(&server, AF_INET, SOCK_STREAM);
  }
  if (r == 0) {
    ac_set_reuse_addr(&server);
    r = ac_bind(&server, (const struct sockaddr *) &addr);
  }
  if (r == 0) {
    r = ac_listen(&server, 4096);
  }
  if (r != 0) {
    fprintf(stderr, "%s: %s\n", name, ac_strerror(r));
    return 1;
  }
  uv_signal_init(ac_map_loop(map), &sigint);
  uv_signal_init(ac_map_loop(map), &sigterm);
  sigint.data = sigterm.data = map;
  uv_signal_start(&sigint, serve_on_signal, SIGINT);
  uv_signal_start(&sigterm, serve_on_signal, SIGTERM);
  uv_unref((uv_handle_t *) &sigint);
  uv_unref((uv_handle_t *) &sigterm);

  r = ac_loop(map, 30.0, 1, AC_FOREVER); /* asyncore.loop(use_poll=True) */

  uv_close((uv_handle_t *) &sigint, NULL);
  uv_close((uv_handle_t *) &sigterm, NULL);
  ac_map_free(map);
  uv_loop_close(uv_default_loop());
  return r == 0 || r == AC_EXIT ? 0 : 1;
}

#endif
